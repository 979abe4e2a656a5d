"""falflow's HTTP plumbing: retries that honour Retry-After, and a transport that scales.

``fal_client``'s own retries ignore ``Retry-After`` and back off from 0.1 s; the calls falflow
makes itself go through :func:`request_with_retries` instead. :class:`ShardedTransport` keeps
~100 concurrent HTTP/1.1 connections cheap to manage.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 8
MAX_RETRY_AFTER_SECONDS = 120.0
SHARD_CONNECTIONS = 8
"""Connections per pool of a :class:`ShardedTransport`."""


def retry_after_seconds(response: httpx.Response) -> float | None:
    """How long the answer asks to wait, bounded: ``Retry-After`` (delta seconds or an HTTP
    date), else ``x-ratelimit-reset`` (seconds); None if it says nothing."""
    value = response.headers.get("retry-after") or response.headers.get("x-ratelimit-reset")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def backoff_seconds(attempt: int, *, base: float = 0.25, cap: float = 20.0) -> float:
    """Exponential backoff with jitter for the ``attempt``-th retry (1-based)."""
    delay: float = min(cap, base * 2.0 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography


def from_ingress(response: httpx.Response, codes: tuple[int, ...] = (502, 503, 504)) -> bool:
    """An answer of fal's ingress proxy, not of fal: one of ``codes`` without
    ``x-fal-request-id`` and with ``nginx`` in its body (``fal_client``'s own test)."""
    return (
        response.status_code in codes
        and "x-fal-request-id" not in response.headers
        and "nginx" in response.text
    )


def transient(response: httpx.Response) -> bool:
    """An answer worth asking again for: 408, 429 or a 5xx."""
    return response.status_code in RETRY_STATUSES


async def request_with_retries(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    pace: Callable[[], Awaitable[None]] | None = None,
    on_throttled: Callable[[float], None] | None = None,
    retry_on: Callable[[httpx.Response], bool] = transient,
    **kwargs: Any,
) -> httpx.Response:
    """Send an idempotent request, retrying transport errors and the answers ``retry_on`` picks
    (by default 408/429/5xx).

    ``pace`` is awaited before every attempt (rate limiting); ``on_throttled`` hears each 429's
    delay so a shared pacer can back off for everyone. The last answer is returned whatever its
    status; the last transport error is raised.
    """
    for attempt in range(1, attempts + 1):
        if pace is not None:
            await pace()
        try:
            response = await http.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == attempts:
                raise
            await anyio.sleep(backoff_seconds(attempt))
            continue
        if not retry_on(response) or attempt == attempts:
            return response
        delay = retry_after_seconds(response)
        if delay is None:
            delay = backoff_seconds(attempt)
        if response.status_code == 429 and on_throttled is not None:
            on_throttled(delay)  # fal's 429s usually say nothing: slow down for everyone anyway
        await anyio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises on its last attempt")


class ShardedTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 transport made of several small connection pools (a request goes to the first
    with a free slot, else the least busy); together they hold at most ``max_connections``, all
    kept alive.

    httpcore's pool re-examines every connection on each request and each response close (and,
    for each idle one, counts all of them again): at 64 requests in flight, one pool of ~100
    connections spent a third of falflow's CPU there (bench/README.md). Pools of
    ``SHARD_CONNECTIONS`` keep that bookkeeping small.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        verify: ssl.SSLContext | bool = True,
        shard_size: int = SHARD_CONNECTIONS,
    ) -> None:
        count = max(1, math.ceil(max_connections / shard_size))
        size = self._size = math.ceil(max_connections / count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._shards = [
            _Shard(httpx.AsyncHTTPTransport(verify=verify, limits=limits)) for _ in range(count)
        ]

    @property
    def in_use(self) -> tuple[int, ...]:
        """Per pool, the requests sent whose response is not closed yet."""
        return tuple(shard.active for shard in self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # First fit: busy pools stay busy and idle connections gather in the last ones, which
        # are rarely examined (each idle connection costs a socket check per pool event).
        shard = next((s for s in self._shards if s.active < self._size), None) or min(
            self._shards, key=lambda s: s.active
        )
        shard.active += 1
        try:
            response = await shard.transport.handle_async_request(request)
        except BaseException:
            shard.active -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_Releasing(response.stream, shard),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.transport.aclose()


class _Shard:
    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.active = 0
        """Requests sent through this pool whose response is not closed yet."""


class _Releasing(httpx.AsyncByteStream):
    """A response body that gives its pool's slot back when closed."""

    def __init__(self, stream: httpx.AsyncByteStream, shard: _Shard) -> None:
        self._stream = stream
        self._shard: _Shard | None = shard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._shard is not None:
                self._shard.active -= 1
                self._shard = None
