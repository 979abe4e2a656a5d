"""The Platform API subset falflow uses (docs/fal-protocol.md §6): payload deletion and the request
listing, with fal's error bodies, API/admin key rules, idempotency keys and a rate limit."""

from __future__ import annotations

import base64
import binascii
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from falflow.emulator.clock import iso, parse_iso
from falflow.emulator.http import HttpError, Request, Response, dumps
from falflow.emulator.queue import COMPLETED, QueuedRequest

if TYPE_CHECKING:
    from falflow.emulator.app import Emulator

DAY = 24 * 3600.0
STATUS_CLASSES = {"success": (200, 300), "user_error": (400, 500), "error": (500, 600)}


def platform_error(status: int, error_type: str, message: str) -> HttpError:
    return HttpError(status, {"error": {"type": error_type, "message": message}})


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a call may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(slots=True)
class _Cached:
    expires_at: float
    request_id: str
    status: int
    body: bytes


class PlatformService:
    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self._idempotent: dict[str, _Cached] = {}
        self._bucket: TokenBucket | None = None
        self._bucket_config: tuple[float, int] | None = None

    def _rate_limit(self) -> None:
        config = self.emu.config
        if config.platform_rate_per_second is None:
            return
        rate = config.platform_rate_per_second
        burst = config.platform_burst or max(1, int(rate))
        if self._bucket is None or self._bucket_config != (rate, burst):
            self._bucket = TokenBucket(rate, burst)
            self._bucket_config = (rate, burst)
        wait = self._bucket.take()
        if wait > 0:
            error = platform_error(
                429, "rate_limited", "Too many requests: slow down and retry after Retry-After"
            )
            error.headers["retry-after"] = str(max(1, math.ceil(wait)))
            raise error

    def _authorize(self, request: Request, admin: bool) -> None:
        config = self.emu.config
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if not key or scheme.lower() != "key":
            raise platform_error(
                401, "authorization_error", "Missing credentials: send 'Authorization: Key <key>'"
            )
        if key not in (config.api_key, config.admin_key):
            raise platform_error(401, "authorization_error", "Invalid API key")
        if admin and key != config.admin_key:
            raise platform_error(
                403, "authorization_error", "This operation requires an admin API key"
            )

    async def handle(self, request: Request, path: str) -> Response:
        """``path`` is what follows ``/v1/``."""
        parts = path.strip("/").split("/")
        if request.method == "GET" and parts == ["models", "requests", "by-endpoint"]:
            self._authorize(request, admin=False)
            self._rate_limit()
            return Response(200, dumps(self._list(request)))
        if (
            request.method == "DELETE"
            and len(parts) == 4
            and parts[:2] == ["models", "requests"]
            and parts[3] == "payloads"
        ):
            self._authorize(request, admin=True)
            self._rate_limit()
            return self._delete(request, parts[2])
        raise platform_error(404, "not_found", f"No such operation: {request.method} /v1/{path}")

    def _delete(self, request: Request, request_id: str) -> Response:
        now = self.emu.clock.now()
        key = request.headers.get("idempotency-key")
        for stale in [k for k, v in self._idempotent.items() if v.expires_at <= now]:
            del self._idempotent[stale]
        if key is not None and key in self._idempotent:
            cached = self._idempotent[key]
            if cached.request_id != request_id:
                raise platform_error(
                    422,
                    "validation_error",
                    "Idempotency-Key was already used for another request: use a new key",
                )
            return Response(cached.status, cached.body, headers={"idempotent-replayed": "true"})
        found = self.emu.queue.requests.get(request_id)
        if found is None:
            error = platform_error(404, "not_found", f"Request {request_id} not found")
            status, body = error.status, dumps(error.body)
        elif found.state != COMPLETED:
            error = platform_error(
                400,
                "validation_error",
                f"Request {request_id} has not finished: cancel it or wait before deleting",
            )
            status, body = error.status, dumps(error.body)
        else:
            self.emu.queue.advance()
            status, body = 200, dumps({"cdn_delete_results": self.emu.queue.delete_payloads(found)})
        if key is not None:
            ttl = self.emu.config.idempotency_ttl_seconds
            self._idempotent[key] = _Cached(now + ttl, request_id, status, body)
        return Response(status, body)

    def _list(self, request: Request) -> dict[str, Any]:
        now = self.emu.queue.advance()
        endpoint_ids = [
            item.strip()
            for value in request.query.get("endpoint_id", [])
            for item in value.split(",")
            if item.strip()
        ]
        if not 1 <= len(endpoint_ids) <= 50:
            raise platform_error(400, "validation_error", "Pass 1 to 50 endpoint_id values")
        request_id = request.arg("request_id")
        try:
            start_raw, end_raw = request.arg("start"), request.arg("end")
            default_window = 90 * DAY if request_id else DAY
            start = parse_iso(start_raw) if start_raw else now - default_window
            end = parse_iso(end_raw) if end_raw else now
        except ValueError:
            raise platform_error(
                400, "validation_error", "start and end must be ISO 8601 dates"
            ) from None
        status = request.arg("status")
        if status is not None and status not in STATUS_CLASSES:
            raise platform_error(
                400, "validation_error", "status must be one of success, error, user_error"
            )
        sort_by = request.arg("sort_by") or "ended_at"
        if sort_by not in ("ended_at", "duration"):
            raise platform_error(400, "validation_error", "sort_by must be ended_at or duration")
        try:
            limit = int(request.arg("limit") or 50)
            cursor = request.arg("cursor")
            page = int(base64.b64decode(cursor, validate=True)) if cursor else 1
        except (ValueError, binascii.Error):
            raise platform_error(
                400,
                "validation_error",
                "limit must be an integer; cursor must come from next_cursor",
            ) from None
        if not 1 <= limit <= 100 or page < 1:
            raise platform_error(400, "validation_error", "limit must be 1 to 100")
        payloads = "payloads" in ",".join(request.query.get("expand", [])).split(",")

        wanted = set(endpoint_ids)
        matches = [
            r
            for r in self.emu.queue.requests.values()
            if r.endpoint_id in wanted
            and _micros(start) <= _micros(r.submitted_at) < _micros(end)
            and (request_id is None or r.id == request_id)
            and (status is None or _in_class(r, status))
        ]
        if sort_by == "duration":
            matches.sort(key=lambda r: _duration(r) or -1.0, reverse=True)
        else:
            matches.sort(key=lambda r: math.inf if r.ended_at is None else r.ended_at, reverse=True)
        chunk = matches[(page - 1) * limit : page * limit]
        has_more = len(matches) > page * limit
        return {
            "items": [self._item(r, now, payloads) for r in chunk],
            "next_cursor": base64.b64encode(str(page + 1).encode()).decode() if has_more else None,
            "has_more": has_more,
        }

    def _item(self, found: QueuedRequest, now: float, payloads: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "request_id": found.id,
            "endpoint_id": found.endpoint_id,
            "started_at": None if found.started_at is None else iso(found.started_at),
            "sent_at": iso(found.submitted_at),
            "ended_at": None if found.ended_at is None else iso(found.ended_at),
            "status_code": None if found.outcome is None else found.outcome.status,
            "duration": _duration(found),
        }
        if payloads:
            queue = self.emu.queue
            stored = found.store_io and queue.input_stored(found, now)
            item["json_input"] = found.arguments if stored else None
            outcome = found.outcome
            kept = outcome is not None and found.store_io and queue.result_available(found, now)
            item["json_output"] = outcome.body if kept and outcome is not None else None
        return item


def _micros(timestamp: float) -> int:
    """Compare times at the microsecond resolution the API prints them with."""
    return round(timestamp * 1_000_000)


def _duration(found: QueuedRequest) -> float | None:
    if found.started_at is None or found.ended_at is None:
        return None
    return round(found.ended_at - found.started_at, 4)


def _in_class(found: QueuedRequest, status: str) -> bool:
    if found.outcome is None:
        return False
    low, high = STATUS_CLASSES[status]
    return low <= found.outcome.status < high
