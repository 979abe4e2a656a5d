"""fal's Platform API (``/v1``): payload deletion, request listing and file ACLs, paced and retried.

Deletion needs an admin key, listing an ordinary one. Calls share one pacer per flow run (the
rate limit is the account's, so one 429 slows every caller) and a concurrency limiter. fal
declares no rate-limit headers: a 429 without ``Retry-After`` slows the pacer all the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Literal

import anyio
import httpx
from prefect.concurrency.asyncio import rate_limit
from pydantic import SecretStr

from falflow.tasks.http import request_with_retries
from falflow.tasks.models import JSON, DeletionResult


class PlatformError(RuntimeError):
    """The Platform API refused or kept failing; the message says what to do next."""


class Pacer:
    """Spaces calls evenly (exact, in-process); a 429 pauses every caller (for its Retry-After or
    ``x-ratelimit-reset`` when fal sends one, else for the current backoff) and slows the pace,
    which creeps back to the configured rate while calls succeed. fal publishes no rate limit, so
    the configured rate is a guess this corrects."""

    SLOWER = 1.25
    FASTER = 0.99
    MAX_INTERVAL = 10.0

    def __init__(self, rate_per_second: float) -> None:
        self.min_interval = 1.0 / rate_per_second
        self.interval = self.min_interval
        self._next_slot = 0.0
        self._paused_until = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next_slot, self._paused_until)
        self._next_slot = slot + self.interval
        if slot > now:
            await anyio.sleep(slot - now)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        self.interval = min(self.interval * self.SLOWER, max(self.MAX_INTERVAL, self.min_interval))

    def succeeded(self) -> None:
        self.interval = max(self.min_interval, self.interval * self.FASTER)


def idempotency_key(request_id: str, attempt: int = 1) -> str:
    """One key per deliberate attempt: retries of one attempt (timeouts, 429s) reuse it, so fal
    sees one operation; a later attempt gets a new key, since fal replays a key's cached answer
    (errors included) for 10 minutes and a replay is not a retry."""
    return f"falflow-delete-{request_id}" + (f"-{attempt}" if attempt > 1 else "")


AclDecision = Literal["allow", "forbid", "hide"]
ACL_PERMITTED = frozenset({400, 404})
"""Answers of :meth:`PlatformClient.acl_status` that say the key may use file ACLs."""


class PlatformClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        api_key: SecretStr | None,
        admin_key: SecretStr | None,
        rate_per_second: float,
        concurrency: int,
        shared_rate_limit: str | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._admin_key = admin_key
        self.pacer = Pacer(rate_per_second)
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.shared_rate_limit = shared_rate_limit
        """A Prefect global rate limit deletions also take a slot of (every run's together)."""

    async def delete_payloads(self, request_id: str, attempt: int = 1) -> DeletionResult:
        """``DELETE /models/requests/{id}/payloads``: fal's answer, which proves nothing by
        itself (a 404 may be a payload row not written yet; an empty or partial result list may
        leave files): the caller confirms."""
        key = idempotency_key(request_id, attempt)
        if self.shared_rate_limit is not None:
            await rate_limit(self.shared_rate_limit, strict=True)
        response = await self._call(
            "DELETE",
            f"/models/requests/{request_id}/payloads",
            admin=True,
            headers={"Idempotency-Key": key},
        )
        result = DeletionResult(
            status_code=response.status_code, attempt=attempt, idempotency_key=key
        )
        if response.status_code == 404:
            return result
        self._raise_for_error(response, f"deleting the payloads of request {request_id}")
        result.cdn_delete_results = response.json().get("cdn_delete_results") or []
        return result

    async def stored_payloads(
        self, endpoint_id: str, *, since: datetime | None, request_ids: set[str | None]
    ) -> dict[str, str]:
        """What fal's listing shows of ``request_ids`` (one endpoint, sent after ``since``):
        ``no stored payload`` or ``payload stored`` per listed request. A request missing from
        the answer is not listed (not started, or not visible yet: the listing lags).

        Paging stops once every one of ``request_ids`` is seen (right in any order): fal sorts
        by end time and the requests a cleanup asks about have just ended, so a rolling deletion
        in a long run usually reads a page or two, not every request since ``since``."""
        shown: dict[str, str] = {}
        only = next(iter(request_ids)) if len(request_ids) == 1 else None
        async for item in self.list_requests(
            [endpoint_id], start=since, request_id=only, expand_payloads=True
        ):
            request_id = item.get("request_id")
            if isinstance(request_id, str) and request_id in request_ids:
                stored = item.get("json_input") is not None or item.get("json_output") is not None
                shown[request_id] = "payload stored" if stored else "no stored payload"
                if len(shown) == len(request_ids):
                    break
        return shown

    async def sign_url(self, url: str, seconds: int) -> str:
        """``POST /storage/files/sign``: a URL that reads a non-public file for ``seconds``
        (at most 7 days). A signed URL is a bearer credential: never log or record it."""
        response = await self._call(
            "POST",
            "/storage/files/sign",
            admin=False,
            params={"url": url},
            json={"expiration_seconds": max(1, min(seconds, 7 * 24 * 3600))},
        )
        self._raise_for_error(response, "signing a file URL")
        signed = response.json().get("signed_url")
        if not isinstance(signed, str):
            raise PlatformError("fal's Platform API answered a sign call without a signed_url")
        return signed

    async def storage_settings(self) -> JSON:
        """``GET /storage/settings``: the account's defaults for new CDN files."""
        response = await self._call("GET", "/storage/settings", admin=False)
        self._raise_for_error(response, "reading the account's storage settings")
        body = response.json()
        return body if isinstance(body, dict) else {}

    async def put_storage_settings(self, settings: JSON) -> JSON:
        """``PUT /storage/settings``: replaces the account's defaults (omitted fields cleared)."""
        response = await self._call(
            "PUT",
            "/storage/settings",
            admin=True,
            json=settings,
        )
        self._raise_for_error(response, "changing the account's storage settings")
        body = response.json()
        return body if isinstance(body, dict) else {}

    async def probe(self, method: str, path: str, *, admin: bool, **kwargs: Any) -> int:
        """The status code of one call, for permission checks (``falflow doctor``)."""
        response = await self._call(method, path, admin=admin, **kwargs)
        return response.status_code

    async def acl_status(self, cdn_url: str) -> int:
        """Whether this key may read file ACLs (and so sign URLs and hide files): the status of
        ``GET /storage/files/acl`` for a file that does not exist — 404 (or 400 for the made-up
        URL) means the key was let in; 401/403 that it was not; 0 that the call failed."""
        probe = f"{cdn_url}/files/b/falflow-probe/permission-probe.png"
        try:
            return await self.probe("GET", "/storage/files/acl", admin=True, params={"url": probe})
        except PlatformError:
            return 0

    async def set_file_acl(self, url: str, decision: AclDecision) -> bool:
        """``PUT /storage/files/acl``: one CDN file's default decision, no per-user rules.
        False when fal has no such file (gone already)."""
        response = await self._call(
            "PUT",
            "/storage/files/acl",
            admin=True,
            params={"url": url},
            json={"default": decision, "rules": []},
        )
        if response.status_code == 404:
            return False
        self._raise_for_error(response, f"setting a file's ACL to {decision}")
        return True

    async def list_requests(
        self,
        endpoint_ids: Sequence[str],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        status: str | None = None,
        request_id: str | None = None,
        expand_payloads: bool = False,
        page_size: int = 100,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of ``GET /models/requests/by-endpoint``, following the cursor.

        ``start`` defaults on fal's side to 24 h ago: pass it to look further back.
        """
        params: dict[str, Any] = {"endpoint_id": list(endpoint_ids), "limit": page_size}
        for name, value in (("start", start), ("end", end)):
            if value is not None:
                params[name] = value.isoformat()
        if status is not None:
            params["status"] = status
        if request_id is not None:
            params["request_id"] = request_id
        if expand_payloads:
            params["expand"] = "payloads"
        async for item in self._pages("/models/requests/by-endpoint", params, "items"):
            yield item

    async def search_requests(self, *, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """``GET /models/requests/search`` over the API's requests on every endpoint, newest
        first (the caller stops when it has gone back far enough)."""
        params: dict[str, Any] = {"only_api_requests": "true", "limit": page_size}
        async for item in self._pages("/models/requests/search", params, "results"):
            yield item

    async def _pages(
        self, path: str, params: dict[str, Any], items: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of a paged listing (``items`` names the list), following ``next_cursor``."""
        while True:
            response = await self._call("GET", path, admin=False, params=params)
            self._raise_for_error(response, f"listing requests ({path})")
            page = response.json()
            for item in page.get(items) or []:
                yield item
            if not page.get("has_more") or page.get("next_cursor") is None:
                return
            params["cursor"] = page["next_cursor"]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        admin: bool,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """One paced, bounded, retried call with the admin key (deletion and account changes;
        falls back to ``FAL_KEY``) or the API key."""
        key = self._admin_key if admin else self._api_key
        if key is None:
            name = "FAL_ADMIN_KEY (or FAL_KEY)" if admin else "FAL_KEY"
            raise PlatformError(f"no fal key for the Platform API: set {name}")
        async with self.limiter:
            response = await request_with_retries(
                self._http,
                method,
                self._base_url + path,
                pace=self.pacer.wait,
                on_throttled=self.pacer.pause,
                headers={"Authorization": f"Key {key.get_secret_value()}", **(headers or {})},
                params=params,
                json=json,
            )
        if response.status_code != 429:
            self.pacer.succeeded()
        return response

    @staticmethod
    def _raise_for_error(response: httpx.Response, doing: str) -> None:
        if response.is_success:
            return
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        kind = error.get("type") or f"HTTP {response.status_code}"
        message = str(error.get("message") or response.reason_phrase)[:300]
        advice = {
            401: "check FAL_ADMIN_KEY / FAL_KEY",
            403: "deleting payloads needs a key with admin scope: set FAL_ADMIN_KEY",
            429: "fal kept rate-limiting: lower FALFLOW_LIMITS__DELETE_RATE_PER_SECOND",
        }.get(response.status_code, "retry later (the janitor does) or check fal's status page")
        raise PlatformError(
            f"fal's Platform API failed {doing}: {kind} ({response.status_code}): {message}; "
            f"{advice}"
        )
