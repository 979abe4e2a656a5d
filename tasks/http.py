"""Retries for idempotent HTTP calls (status, result, cancel, Platform API), honouring Retry-After.

``fal_client``'s own retries ignore ``Retry-After`` and back off from 0.1 s; the calls falflow
makes itself go through :func:`request_with_retries` instead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 8
MAX_RETRY_AFTER_SECONDS = 120.0


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (delta or HTTP date), bounded; None if absent."""
    value = response.headers.get("retry-after")
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
        if response.status_code == 429 and delay is not None and on_throttled is not None:
            on_throttled(delay)
        await anyio.sleep(backoff_seconds(attempt) if delay is None else delay)
    raise AssertionError("unreachable: the loop returns or raises on its last attempt")
