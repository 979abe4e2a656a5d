"""fal's Platform API (``/v1``): payload deletion and request listing, paced and retried.

Deletion needs an admin key, listing an ordinary one. Calls share one pacer per flow run (the
rate limit is the account's, so one 429 slows every caller) and a concurrency limiter.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import anyio
import httpx
from pydantic import SecretStr

from falflow.tasks.http import request_with_retries
from falflow.tasks.models import DeletionResult


class PlatformError(RuntimeError):
    """The Platform API refused or kept failing; the message says what to do next."""


class Pacer:
    """Spaces calls evenly (exact, in-process); a 429 pauses every caller for its Retry-After and
    slows the pace, which creeps back to the configured rate while calls succeed. fal publishes
    no rate limit, so the configured rate is a guess this corrects."""

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


def idempotency_key(request_id: str) -> str:
    """Derived from the request id, so a retried or re-run delete is the same operation to fal."""
    return f"falflow-delete-{request_id}"


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
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._admin_key = admin_key
        self.pacer = Pacer(rate_per_second)
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def delete_payloads(self, request_id: str) -> DeletionResult:
        """``DELETE /models/requests/{id}/payloads``; a 404 counts as already gone."""
        response = await self._call(
            "DELETE",
            f"/models/requests/{request_id}/payloads",
            key=self._admin_key,
            key_name="FAL_ADMIN_KEY (or FAL_KEY)",
            headers={"Idempotency-Key": idempotency_key(request_id)},
        )
        if response.status_code == 404:
            return DeletionResult(status_code=404, already_gone=True)
        self._raise_for_error(response, f"deleting the payloads of request {request_id}")
        results = response.json().get("cdn_delete_results") or []
        return DeletionResult(status_code=response.status_code, cdn_delete_results=results)

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
        while True:
            response = await self._call(
                "GET",
                "/models/requests/by-endpoint",
                key=self._api_key,
                key_name="FAL_KEY",
                params=params,
            )
            self._raise_for_error(response, "listing requests")
            page = response.json()
            for item in page.get("items") or []:
                yield item
            if not page.get("has_more") or page.get("next_cursor") is None:
                return
            params["cursor"] = page["next_cursor"]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        key: SecretStr | None,
        key_name: str,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        if key is None:
            raise PlatformError(f"no fal key for the Platform API: set {key_name}")
        async with self.limiter:
            response = await request_with_retries(
                self._http,
                method,
                self._base_url + path,
                pace=self.pacer.wait,
                on_throttled=self.pacer.pause,
                headers={"Authorization": f"Key {key.get_secret_value()}", **(headers or {})},
                params=params,
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
