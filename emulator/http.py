"""A lean ASGI layer: the emulator must answer thousands of status calls a second on 2 cores, so
it routes raw ASGI scopes itself instead of going through a framework."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE = b"application/json"


class HttpError(Exception):
    """Raised by handlers to answer with a JSON error body."""

    def __init__(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


class AbortConnection(Exception):
    """Raised (also from inside a body stream) to drop the connection without a clean answer."""


class Request:
    __slots__ = (
        "_gone",
        "_query",
        "_watcher",
        "headers",
        "method",
        "path",
        "receive",
        "scope",
        "send",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        self._query: dict[str, list[str]] | None = None
        self._gone: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def gone(self) -> asyncio.Future[None]:
        """Resolves when the client disconnects. Use only once the body has been read: the
        watcher it starts consumes ``receive``."""
        if self._gone is None:
            loop = asyncio.get_running_loop()
            self._gone = loop.create_future()
            self._watcher = loop.create_task(self._watch(self._gone))
        return self._gone

    async def _watch(self, gone: asyncio.Future[None]) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not gone.done():
            gone.set_result(None)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            raw = self.scope["query_string"].decode("latin-1")
            self._query = parse_qs(raw, keep_blank_values=True) if raw else {}
        return self._query

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise AbortConnection
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return

    async def body(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def json(self) -> Any:
        raw = await self.body()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise HttpError(
                422, {"detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "json_invalid"}]}
            ) from None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None
    """Sent as ``x-fal-request-id`` (a fresh id when None); ``fal_request_id=False`` omits it."""
    fal_request_id: bool = True
    stream: AsyncGenerator[bytes, None] | None = None
    """Body chunks sent after the headers; ``content_length`` must then be set (or None for
    an open-ended stream such as server-sent events)."""
    content_length: int | None = None


def dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def json_response(
    status: int,
    data: Any,
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return Response(status, dumps(data), request_id=request_id, headers=dict(headers or {}))


async def send_response(request: Request, response: Response) -> None:
    send = request.send
    headers: list[tuple[bytes, bytes]] = [(b"content-type", response.content_type)]
    if response.fal_request_id:
        rid = response.request_id or str(uuid.uuid4())
        headers.append((b"x-fal-request-id", rid.encode()))
    for name, value in response.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    if response.content_length is not None:
        headers.append((b"content-length", str(response.content_length).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    gone = request.gone()  # uvicorn's send ignores a gone client: stop producing instead
    try:
        async for chunk in response.stream:
            if gone.done():
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        await response.stream.aclose()
    await send({"type": "http.response.body", "body": b""})


async def abort_connection(send: Send) -> None:
    """Drop the TCP connection under this request, as a crashing proxy or a network fault would.

    ASGI has no such message, so reach the transport through uvicorn's request cycle (the
    object ``send`` is bound to); failing that, close after whatever was sent.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("cannot reach the connection to drop it (server is not uvicorn)")
    transport.abort()
    # Let uvicorn see connection_lost before the app returns, so it logs nothing.
    for _ in range(3):
        await asyncio.sleep(0)
