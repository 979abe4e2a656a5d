"""The fal webhook receiver: verify the delivery, emit one Prefect event per request id.

fal delivers a request's result to ``?fal_webhook=<url>``; deliveries are retried and can repeat,
so the receiver is idempotent on the request id twice over: it remembers ids it has emitted (and
answers a repeat 200 without emitting), and the event id is derived from the request id, so the
Prefect server's own de-duplication drops a repeat that reaches another replica or a restarted one.
A delivery is answered 200 only once the Prefect server has confirmed its event (else 503, and fal
delivers it again), so stopping the receiver never loses one.

Events (for automations and deployment triggers):
- ``fal.request.completed`` / ``fal.request.failed``, resource ``fal.request.<request id>``,
  payload ``{request_id, gateway_request_id, status, error, payload_error, has_output}``. The
  output itself is not copied into the event: its CDN URLs are public to whoever holds them.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
from prefect.events import Event
from prefect.events.clients import EventsClient, get_events_client
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from falflow.settings import Settings
from falflow.webhooks.signature import (
    JwksCache,
    JwksUnavailable,
    SignedDelivery,
    WebhookRejected,
    verify_delivery,
)

logger = logging.getLogger("falflow.webhooks")

COMPLETED_EVENT = "fal.request.completed"
FAILED_EVENT = "fal.request.failed"
_EVENT_NAMESPACE = uuid.UUID("6f0c5d3e-7a51-4c8e-9d1f-3b2a4e5c6d70")
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_MAX_TEXT = 1000


def jwks_url(settings: Settings) -> str:
    """The configured JWKS URL, or fal's own one under the configured REST URL."""
    return settings.webhooks.jwks_url or f"{settings.fal.rest_url}/.well-known/jwks.json"


def event_id(request_id: str) -> uuid.UUID:
    """The same id for every delivery of one request, so the Prefect server drops repeats."""
    return uuid.uuid5(_EVENT_NAMESPACE, f"fal.request.{request_id}")


class RecentIds:
    """Request ids seen in the last ``ttl_seconds`` (insertion-ordered, so expiry is O(1))."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> bool:
        """Remember ``request_id``; False when it was already remembered."""
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now - self._ttl:
            self._seen.popitem(last=False)
        if request_id in self._seen:
            return False
        self._seen[request_id] = now
        return True

    def discard(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._seen)


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_TEXT]


def parse_body(delivery: SignedDelivery) -> dict[str, Any]:
    """The delivery's JSON body, checked against the signed request id (400 otherwise)."""
    try:
        body = json.loads(delivery.body)
    except ValueError:
        raise WebhookRejected(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise WebhookRejected(400, "body is not a JSON object")
    # fal signs a retried request's delivery with its gateway request id: either id may match
    if delivery.request_id not in (body.get("request_id"), body.get("gateway_request_id")):
        raise WebhookRejected(400, "body request_id differs from the signed request id")
    if not isinstance(body.get("request_id"), str) or not _REQUEST_ID.fullmatch(body["request_id"]):
        raise WebhookRejected(400, "body request_id has an unexpected form")
    if body.get("status") not in ("OK", "ERROR"):
        raise WebhookRejected(400, "status must be OK or ERROR")
    return body


def request_event(delivery: SignedDelivery, body: dict[str, Any]) -> Event:
    """The Prefect event for a verified delivery (its id derived from the request id, never
    from the gateway id a retried request's delivery is signed with)."""
    ok = body["status"] == "OK"
    request_id = str(body["request_id"])
    return Event.model_validate(
        {
            "event": COMPLETED_EVENT if ok else FAILED_EVENT,
            "resource": {
                "prefect.resource.id": f"fal.request.{request_id}",
                "prefect.resource.name": request_id,
                "fal.user-id": delivery.user_id,
            },
            "occurred": datetime.fromtimestamp(delivery.timestamp, UTC),
            "payload": {
                "request_id": request_id,
                "gateway_request_id": body.get("gateway_request_id"),
                "status": body["status"],
                "error": _text(body.get("error")),
                "payload_error": _text(body.get("payload_error")),
                "has_output": body.get("payload") is not None,
            },
            "id": event_id(request_id),
        }
    )


def default_events_client() -> EventsClient:
    """A client for the configured Prefect API that confirms every event before returning.

    ``checkpoint_every=1``: each emit waits for the server's answer to a ping sent after the
    event, so a delivery is acknowledged to fal only once Prefect has the event.
    """
    return get_events_client(reconnection_attempts=2, checkpoint_every=1)


class EventSink:
    """One events client shared by every delivery: opened on first use, re-opened after a
    failure, used by one delivery at a time (the client reconnects on its own, not concurrently)."""

    def __init__(self, client_factory: Callable[[], EventsClient]) -> None:
        self._factory = client_factory
        self._client: EventsClient | None = None
        self._stack = AsyncExitStack()
        self._lock = anyio.Lock()

    async def emit(self, event: Event) -> None:
        """Send ``event``; raises whatever kept it from reaching Prefect."""
        async with self._lock:
            try:
                if self._client is None:
                    self._client = await self._stack.enter_async_context(self._factory())
                await self._client.emit(event)
            except BaseException:
                await self._close()
                raise

    async def _close(self) -> None:
        self._client = None
        stack, self._stack = self._stack, AsyncExitStack()
        with anyio.CancelScope(shield=True):
            try:
                await stack.aclose()
            except Exception as exc:  # closing a broken connection may fail too
                logger.debug("closing the events client: %s", exc)

    async def aclose(self) -> None:
        async with self._lock:
            await self._close()


class Receiver:
    """Per-app state: the key cache, the remembered ids, and the checks in order."""

    def __init__(
        self,
        settings: Settings,
        jwks: JwksCache,
        events: EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings.webhooks
        self.jwks = jwks
        self.events = events
        self.seen = RecentIds(self.settings.dedupe_seconds)
        self._clock = clock

    async def handle(self, request: Request) -> JSONResponse:
        signed_id = request.headers.get("X-Fal-Webhook-Request-Id", "")
        try:
            try:
                with anyio.fail_after(self.settings.body_timeout_seconds):
                    body_bytes = await self._read_body(request)
            except TimeoutError:
                raise WebhookRejected(
                    408, f"body not received within {self.settings.body_timeout_seconds:g} s"
                ) from None
            delivery = SignedDelivery.parse(request.headers, body_bytes)
            if not _REQUEST_ID.fullmatch(delivery.request_id):
                raise WebhookRejected(400, "request id has an unexpected form")
            await verify_delivery(
                delivery,
                self.jwks,
                now=self._clock(),
                tolerance_seconds=self.settings.tolerance_seconds,
            )
            allowed = self.settings.allowed_user_ids
            if allowed and delivery.user_id not in allowed:
                raise WebhookRejected(403, "deliveries for this fal user are not accepted here")
            body = parse_body(delivery)
        except ClientDisconnect:  # one line: a probe doing this in a loop must not flood the log
            logger.warning("fal webhook %r: the client disconnected mid-body", signed_id[:200])
            return JSONResponse({"error": "client disconnected"}, status_code=400)
        except WebhookRejected as rejected:
            logger.warning("rejected fal webhook %r: %s", signed_id[:200], rejected.reason)
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status_code)
        except JwksUnavailable as exc:
            logger.error("cannot verify fal webhook %r: %s", signed_id[:200], exc)
            return JSONResponse({"error": "signing keys unavailable, retry later"}, 503)

        request_id = body["request_id"]
        if not self.seen.add(request_id):
            logger.info("fal webhook %s delivered again: acknowledged, not re-emitted", request_id)
            return JSONResponse({"status": "duplicate", "request_id": request_id})
        event = request_event(delivery, body)
        try:
            await self.events.emit(event)
        except Exception as exc:
            # Not acknowledged, so fal delivers it again; the next delivery reconnects.
            self.seen.discard(request_id)
            logger.error(
                "fal webhook %s: could not send its event to Prefect (%s: %s); answered 503",
                request_id,
                type(exc).__name__,
                exc,
            )
            return JSONResponse({"error": "Prefect is unreachable, retry later"}, 503)
        logger.info("fal webhook %s: emitted %s", request_id, event.event)
        return JSONResponse(
            {"status": "accepted", "request_id": request_id, "event_id": str(event.id)}
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise WebhookRejected(413, f"body is larger than {limit} bytes")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise WebhookRejected(413, f"body is larger than {limit} bytes")
        return bytes(chunks)


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    events_client: Callable[[], EventsClient] = default_events_client,
) -> Starlette:
    """The receiver as an ASGI app: ``POST {webhooks.path}`` and ``GET /healthz``.

    ``clock`` (Unix seconds) is what a delivery's timestamp is compared with; ``events_client``
    makes the Prefect events client (default: the configured API, see
    :func:`default_events_client`). While the app runs, ``app.state.receiver`` is its
    :class:`Receiver`.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ca = settings.fal.ca_bundle
        verify = True if ca is None else ssl.create_default_context(cafile=str(ca))
        sink = EventSink(events_client)
        async with httpx.AsyncClient(verify=verify, timeout=10.0) as http:
            jwks = JwksCache(
                jwks_url(settings),
                http,
                max_age_seconds=settings.webhooks.jwks_cache_seconds,
                refetch_interval_seconds=settings.webhooks.jwks_refetch_seconds,
            )
            app.state.receiver = Receiver(settings, jwks, sink, clock)
            if not settings.webhooks.allowed_user_ids:
                logger.warning(
                    "accepting fal webhooks for any fal user: set FALFLOW_WEBHOOKS__ALLOWED_USER_IDS"
                )
            try:
                yield
            finally:
                await sink.aclose()

    async def webhook(request: Request) -> JSONResponse:
        receiver: Receiver = request.app.state.receiver
        return await receiver.handle(request)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route(settings.webhooks.path, webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
