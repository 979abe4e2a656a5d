"""The Platform API subset falflow relies on (docs/fal-protocol.md §6): payload deletion, the
request listing and search, and the storage controls (account settings, file ACLs, signed URLs),
with fal's error bodies, API/admin key rules, idempotency keys and a rate limit."""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from falflow.emulator.clock import iso, micros, parse_iso_micros
from falflow.emulator.config import PUBLIC, Acl, StorageSettings
from falflow.emulator.http import HttpError, Request, Response, dumps
from falflow.emulator.queue import COMPLETED, QueuedRequest

if TYPE_CHECKING:
    from falflow.emulator.app import Emulator
    from falflow.emulator.cdn import CdnFile

DAY = 24 * 3600.0
STATUS_CLASSES = {"success": (200, 300), "user_error": (400, 500), "error": (500, 600)}
MAX_SIGNED_SECONDS = 7 * 24 * 3600
_Model = TypeVar("_Model", bound=BaseModel)


class SignRequest(BaseModel):
    """The body of ``POST /storage/files/sign``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    expiration_seconds: Annotated[int, Field(ge=1, le=MAX_SIGNED_SECONDS)]


def platform_error(status: int, error_type: str, message: str) -> HttpError:
    return HttpError(status, {"error": {"type": error_type, "message": message}})


def _validated(model: type[_Model], value: Any) -> _Model:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise platform_error(400, "validation_error", f"Invalid body: {problems}") from None


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
            error = platform_error(429, "rate_limited", "Rate limit exceeded: slow down")
            seconds = str(max(1, math.ceil(wait)))
            if config.platform_retry_after:
                error.headers["retry-after"] = seconds
            if config.platform_ratelimit_reset:
                error.headers["x-ratelimit-reset"] = seconds
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
        method = request.method
        if (
            method == "DELETE"
            and len(parts) == 4
            and parts[:2] == ["models", "requests"]
            and parts[3] == "payloads"
        ):
            self._authorize(request, admin=True)
            self._rate_limit()
            return self._delete(request, parts[2])
        known = {
            ("GET", "models/requests/by-endpoint"),
            ("GET", "models/requests/search"),
            ("GET", "storage/settings"),
            ("PUT", "storage/settings"),
            ("GET", "storage/files/acl"),
            ("PUT", "storage/files/acl"),
            ("POST", "storage/files/sign"),
        }
        route = "/".join(parts)
        if (method, route) not in known:
            raise platform_error(404, "not_found", f"No such operation: {method} /v1/{path}")
        # Any valid key may use these (fal asks for assets:* / account:settings:* permissions,
        # which the emulator's two keys both have).
        self._authorize(request, admin=False)
        self._rate_limit()
        if route == "models/requests/by-endpoint":
            return Response(200, dumps(self._list(request)))
        if route == "models/requests/search":
            return Response(200, dumps(self._search(request)))
        cdn = self.emu.cdn
        if route == "storage/settings":
            if method == "PUT":
                cdn.set_settings(_validated(StorageSettings, await _json_body(request)))
            return Response(200, dumps(cdn.settings.model_dump(mode="json")))
        target = self._file(request)
        if route == "storage/files/sign":
            body = _validated(SignRequest, await _json_body(request))
            return Response(200, dumps({"signed_url": cdn.sign(target, body.expiration_seconds)}))
        if method == "PUT":
            target.acl = cdn.known_acl(_validated(Acl, await _json_body(request)))
        return Response(200, dumps((target.acl or PUBLIC).model_dump(mode="json")))

    def _file(self, request: Request) -> CdnFile:
        """The live CDN file named by the ``url`` query parameter."""
        cdn = self.emu.cdn
        url = request.arg("url")
        if not url:
            raise platform_error(400, "validation_error", "url is required")
        if "?" in url or "#" in url:
            raise platform_error(400, "validation_error", "url must not contain query parameters")
        if not url.startswith(cdn.files_url):
            raise platform_error(400, "validation_error", "url is not a fal CDN file URL")
        found = cdn.lookup(url, at=self.emu.clock.now())
        if found is None:
            raise platform_error(404, "not_found", "File not found")
        return found

    # -- payload deletion ------------------------------------------------------------------------

    def _delete(self, request: Request, request_id: str) -> Response:
        now = self.emu.queue.advance()
        config = self.emu.config
        key = request.headers.get("idempotency-key")
        for stale in [k for k, v in self._idempotent.items() if v.expires_at <= now]:
            del self._idempotent[stale]
        if key is not None and key in self._idempotent:
            cached = self._idempotent[key]
            if cached.request_id != request_id:
                raise platform_error(
                    400,
                    "validation_error",
                    "Idempotency-Key was already used for another request: use a new key",
                )
            return Response(cached.status, cached.body, headers={"idempotent-replayed": "true"})
        found = self.emu.queue.requests.get(request_id)
        if found is None or (
            found.ended_at is not None and now < found.ended_at + config.payload_row_delay_seconds
        ):
            # Unknown, or its payload record is not written yet: the same answer.
            error = platform_error(404, "not_found", f"Request {request_id} not found")
            status, body = error.status, dumps(error.body)
        elif found.state != COMPLETED:
            error = platform_error(
                400,
                "validation_error",
                f"Request {request_id} has not finished: cancel it or wait before deleting",
            )
            status, body = error.status, dumps(error.body)
        elif self.emu.faults.draw("empty_delete_results"):
            status, body = 200, dumps({"cdn_delete_results": []})
        else:
            status, body = 200, dumps({"cdn_delete_results": self.emu.queue.delete_payloads(found)})
        if key is not None:
            ttl = config.idempotency_ttl_seconds
            self._idempotent[key] = _Cached(now + ttl, request_id, status, body)
        return Response(status, body)

    # -- listing and search ----------------------------------------------------------------------

    def _visible(self, found: QueuedRequest, now: float) -> bool:
        """Whether the listing shows the request yet: ``listing_lag_seconds`` after it started
        (or, with ``listing_includes_unstarted``, after it was sent)."""
        config = self.emu.config
        since = found.started_at
        if since is None and config.listing_includes_unstarted:
            since = found.submitted_at
        return since is not None and since + config.listing_lag_seconds <= now

    def _shown_end(self, found: QueuedRequest, now: float) -> float | None:
        """``ended_at`` as the listing shows it: None until ``listing_lag_seconds`` after."""
        ended = found.ended_at
        if ended is None or ended + self.emu.config.listing_lag_seconds > now:
            return None
        return ended

    def _list(self, request: Request) -> dict[str, Any]:
        now = self.emu.queue.advance()
        endpoint_ids = _endpoint_ids(request)
        if not 1 <= len(endpoint_ids) <= 50:
            raise platform_error(400, "validation_error", "Pass 1 to 50 endpoint_id values")
        request_id = request.arg("request_id")
        try:
            start_raw, end_raw = request.arg("start"), request.arg("end")
            default_window = 90 * DAY if request_id else DAY
            start = parse_iso_micros(start_raw) if start_raw else micros(now - default_window)
            end = parse_iso_micros(end_raw) if end_raw else micros(now)
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
        limit, page = _paging(request, maximum=100)
        payloads = "payloads" in ",".join(request.query.get("expand", [])).split(",")

        wanted = set(endpoint_ids)
        matches = [
            r
            for r in self.emu.queue.requests.values()
            if r.endpoint_id in wanted
            and start <= micros(r.submitted_at) < end
            and (request_id is None or r.id == request_id)
            and self._visible(r, now)
            and (status is None or self._in_class(r, now, status))
        ]
        if sort_by == "duration":
            matches.sort(key=lambda r: self._duration(r, now) or -1.0, reverse=True)
        else:
            matches.sort(key=lambda r: self._shown_end(r, now) or math.inf, reverse=True)
        chunk = matches[(page - 1) * limit : page * limit]
        has_more = len(matches) > page * limit
        return {
            "items": [self._item(r, now, payloads) for r in chunk],
            "next_cursor": _cursor(page + 1) if has_more else None,
            "has_more": has_more,
        }

    def _search(self, request: Request) -> dict[str, Any]:
        """``GET /models/requests/search`` as a filtered browse (newest first); the semantic
        modes (``query``, ``image_url``, ``video_url``) are not emulated."""
        now = self.emu.queue.advance()
        endpoint_ids = _endpoint_ids(request)
        if not endpoint_ids and request.arg("endpoint"):  # the deprecated single filter
            endpoint_ids = [str(request.arg("endpoint"))]
        given = "endpoint_id" in request.query or "endpoint" in request.query
        if len(endpoint_ids) > 50 or (given and not endpoint_ids):
            raise platform_error(400, "validation_error", "Pass 1 to 50 endpoint_id values")
        semantic = [name for name in ("query", "image_url", "video_url") if request.arg(name)]
        if len(semantic) > 1:
            raise platform_error(
                400, "validation_error", "query, image_url and video_url are mutually exclusive"
            )
        only_api = _flag(request, "only_api_requests")
        exclude_api = _flag(request, "exclude_api_requests")
        if only_api and exclude_api:
            raise platform_error(
                400,
                "validation_error",
                "only_api_requests and exclude_api_requests are mutually exclusive",
            )
        similarity = request.arg("min_similarity")
        if similarity is not None:
            try:
                valid = 0.0 <= float(similarity) <= 1.0
            except ValueError:
                valid = False
            if not valid:
                raise platform_error(
                    400, "validation_error", "min_similarity must be a number from 0 to 1"
                )
        limit, page = _paging(request, maximum=None)
        if semantic:
            raise platform_error(
                501, "not_implemented", "Semantic search is not available in the emulator"
            )
        limit = min(limit, self.emu.config.search_max_limit)
        wanted = set(endpoint_ids)
        matches = [
            r
            for r in reversed(self.emu.queue.requests.values())
            if (not wanted or r.endpoint_id in wanted) and self._visible(r, now)
        ]
        if exclude_api:
            matches = []  # every request the emulator sees was made with an API key
        matches.sort(key=lambda r: r.submitted_at, reverse=True)
        chunk = matches[(page - 1) * limit : page * limit]
        has_more = len(matches) > page * limit
        return {
            "results": [self._item(r, now, payloads=False) for r in chunk],
            "next_cursor": _cursor(page + 1) if has_more else None,
            "has_more": has_more,
        }

    def _duration(self, found: QueuedRequest, now: float) -> float | None:
        ended = self._shown_end(found, now)
        if found.started_at is None or ended is None:
            return None
        return round(ended - found.started_at, 4)

    def _in_class(self, found: QueuedRequest, now: float, status: str) -> bool:
        if found.outcome is None or self._shown_end(found, now) is None:
            return False
        low, high = STATUS_CLASSES[status]
        return low <= found.outcome.status < high

    def _item(self, found: QueuedRequest, now: float, payloads: bool) -> dict[str, Any]:
        ended = self._shown_end(found, now)
        outcome = found.outcome if ended is not None else None
        item: dict[str, Any] = {
            "request_id": found.id,
            "endpoint_id": found.endpoint_id,
            "started_at": None if found.started_at is None else iso(found.started_at),
            "sent_at": iso(found.submitted_at),
            "ended_at": None if ended is None else iso(ended),
            "status_code": None if outcome is None else outcome.status,
            "duration": self._duration(found, now),
        }
        if payloads:
            queue = self.emu.queue
            stored = found.store_io and queue.input_stored(found, now)
            item["json_input"] = found.arguments if stored else None
            kept = outcome is not None and found.store_io and queue.result_available(found, now)
            item["json_output"] = outcome.body if kept and outcome is not None else None
        return item


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        raise platform_error(400, "validation_error", "The body must be JSON") from None


def _endpoint_ids(request: Request) -> list[str]:
    """``endpoint_id`` values, repeated and/or comma-separated."""
    return [
        item.strip()
        for value in request.query.get("endpoint_id", [])
        for item in value.split(",")
        if item.strip()
    ]


def _flag(request: Request, name: str) -> bool:
    value = request.arg(name)
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise platform_error(400, "validation_error", f"{name} must be true or false")


def _cursor(page: int) -> str:
    return base64.b64encode(str(page).encode()).decode()


def _paging(request: Request, maximum: int | None) -> tuple[int, int]:
    """``(limit, page)`` from ``limit`` (default 50) and ``cursor`` (a base64 page number)."""
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
    if limit < 1 or (maximum is not None and limit > maximum):
        raise platform_error(
            400, "validation_error", f"limit must be 1 to {maximum}" if maximum else "limit >= 1"
        )
    if page < 1:
        raise platform_error(400, "validation_error", "cursor must come from next_cursor")
    return limit, page
