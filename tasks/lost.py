"""Lost submits: finding the request fal accepted for a submit whose answer never arrived.

A submit is *lost* when it was attempted (the ledger holds ``submit_attempted_at``) but its request
id never reached the ledger: the answer was lost in transit (record ``submit_unknown``) or the run
died mid-POST (record still ``pending``). falflow never sends such a submit again; it looks for
the request in fal's request listing instead. Two callers, one rule:

- :func:`falflow.tasks.submit.reconcile_submit`, right after the answer was lost or when a re-run
  resumes the record (:func:`search`, asking fal for the endpoint's requests with their inputs);
- the janitor's survey (:func:`falflow.tasks.janitor.survey`), for records of runs that are over,
  against the requests no ledger record knows (:func:`list_fal_requests`, :func:`stored_input`).

The rule (:func:`match`): a request is the lost submit's when it is on the same endpoint, was sent
within the closed window ``[attempted - SUBMIT_SKEW, until)``, its stored input equals the
arguments the submit sent, no other record has taken it, and it is the *only* such request.
Two candidates are never guessed between: the other one may be another run's or another tool's
request, which falflow must not archive as its own and then delete.

Listings always send both ``start`` and ``end`` (fal silently starts a listing 24 h ago
otherwise), cut into windows of at most a day (:func:`listing_windows`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from falflow.settings import RetentionPolicy
from falflow.tasks.models import utcnow
from falflow.tasks.runtime import Runtime
from falflow.tasks.signing import unsigned

SUBMIT_SKEW = timedelta(minutes=5)
"""A lost submit's request may carry a ``sent_at`` a little before the recorded attempt (fal's
clock is not ours): the search window starts this long before the attempt."""
LISTING_SLACK = timedelta(minutes=1)
"""A listing's end is exclusive and fal's clock is not ours: a search made right after a lost
answer looks this far past now."""
LISTING_LAG = timedelta(seconds=12)
"""How long after a request starts fal's listing may still not show it (it lags the queue; a
request still queued is not listed at all). A search made sooner after an attempt than this
proves nothing by finding nothing."""
WINDOW = timedelta(hours=24)
"""The longest listing window: each is a closed [start, end) range sent explicitly."""
ENDPOINTS_PER_LISTING = 50
"""fal's by-endpoint listing takes 1-50 endpoint ids."""


class FalRequest(BaseModel):
    """One item of fal's request listing (what falflow needs of it)."""

    request_id: str
    endpoint_id: str
    sent_at: datetime | None = None
    ended_at: datetime | None = None
    status_code: int | None = None

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> FalRequest | None:
        """The listing item ``item``, or None if it names no request."""
        request_id = item.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            return None
        return cls(
            request_id=request_id,
            endpoint_id=str(item.get("endpoint_id") or ""),
            sent_at=_time(item.get("sent_at") or item.get("started_at")),
            ended_at=_time(item.get("ended_at")),
            status_code=item.get("status_code"),
        )


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def past_start_deadline(policy: RetentionPolicy, attempted: datetime, now: datetime) -> bool:
    """Whether a request submitted at ``attempted`` can no longer appear: fal never starts one
    after its start deadline, and the listing shows a started one within ``LISTING_LAG``. Only
    then does a listing without it prove it never reached fal. Without stored inputs
    (``store_io`` off) nothing can be matched, so nothing is ever proven absent."""
    deadline = policy.start_timeout_seconds
    return (
        policy.store_io
        and deadline is not None
        and now >= attempted + timedelta(seconds=deadline) + LISTING_LAG
    )


def search_start(attempted: datetime) -> datetime:
    """Where the search for the request of a submit attempted at ``attempted`` starts."""
    return attempted - SUBMIT_SKEW


# --- fal's request listing -----------------------------------------------------------------------


def listing_windows(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` cut into consecutive closed windows of at most :data:`WINDOW`."""
    windows = []
    while start < end:
        stop = min(start + WINDOW, end)
        windows.append((start, stop))
        start = stop
    return windows


async def _listing(
    rt: Runtime,
    endpoints: Sequence[str],
    start: datetime,
    end: datetime,
    *,
    expand_payloads: bool = False,
) -> AsyncIterator[tuple[FalRequest, dict[str, Any]]]:
    """Every request fal lists for ``endpoints`` sent in ``[start, end)``, with its raw item."""
    ordered = sorted(set(endpoints))
    for first in range(0, len(ordered), ENDPOINTS_PER_LISTING):
        batch = ordered[first : first + ENDPOINTS_PER_LISTING]
        for window_start, window_end in listing_windows(start, end):
            async for item in rt.platform.list_requests(
                batch, start=window_start, end=window_end, expand_payloads=expand_payloads
            ):
                request = FalRequest.from_item(item)
                if request is not None:
                    yield request, item


async def list_fal_requests(
    rt: Runtime, endpoints: Sequence[str], start: datetime, end: datetime
) -> dict[str, FalRequest]:
    """Every request fal lists for ``endpoints`` sent in ``[start, end)``, by request id."""
    return {request.request_id: request async for request, _ in _listing(rt, endpoints, start, end)}


async def requests_elsewhere(
    rt: Runtime, known_endpoints: set[str], start: datetime
) -> list[FalRequest]:
    """Requests the account's API keys sent since ``start`` on endpoints not in
    ``known_endpoints`` (no ledger record, and no listing by endpoint, would find them)."""
    found: list[FalRequest] = []
    async for item in rt.platform.search_requests():
        request = FalRequest.from_item(item)
        if request is None:
            continue
        if request.sent_at is not None and request.sent_at < start:
            return found  # newest first: the rest is older still
        if request.endpoint_id not in known_endpoints:
            found.append(request)
    return found


async def stored_input(rt: Runtime, request: FalRequest, start: datetime, end: datetime) -> Any:
    """The JSON input fal stored for ``request`` (None when ``X-Fal-Store-IO: 0`` was sent)."""
    async for item in rt.platform.list_requests(
        [request.endpoint_id],
        start=start,
        end=end,
        request_id=request.request_id,
        expand_payloads=True,
    ):
        if item.get("request_id") == request.request_id:
            return unsigned(item.get("json_input"), rt.settings.fal.cdn_hosts)
    return None


# --- the match -----------------------------------------------------------------------------------


async def match(
    endpoint: str,
    arguments: Any,
    attempted: datetime,
    until: datetime,
    listed: Iterable[tuple[FalRequest, Any]],
    taken: Callable[[str], Awaitable[bool]],
) -> list[FalRequest]:
    """Every listed request that may be the one a submit attempted at ``attempted`` created.

    ``listed`` pairs each request with the input fal stored for it. A request matches when it is
    on ``endpoint``, was sent in ``[search_start(attempted), until)`` (a request fal lists with no
    time is taken as inside the window its listing asked for), its stored input equals
    ``arguments`` (None, an input that cannot be known, matches nothing) and ``taken`` does not
    say another record holds it. The submit is resolved only when exactly one request matches.
    """
    if arguments is None:
        return []
    since = search_start(attempted)
    found = []
    for request, stored in sorted(listed, key=lambda pair: pair[0].sent_at or attempted):
        if (
            request.endpoint_id == endpoint
            and (request.sent_at is None or since <= request.sent_at < until)
            and stored == arguments
            and not await taken(request.request_id)
        ):
            found.append(request)
    return found


async def search(
    rt: Runtime,
    endpoint: str,
    arguments: Any,
    attempted: datetime,
    taken: Callable[[str], Awaitable[bool]],
) -> list[FalRequest]:
    """:func:`match` over every request fal lists for ``endpoint`` since the attempt (asked now,
    with each request's stored input: what a run resuming a lost submit uses)."""
    until = utcnow() + LISTING_SLACK
    hosts = rt.settings.fal.cdn_hosts
    listed = [
        (request, unsigned(item.get("json_input"), hosts))  # falflow signs private inputs
        async for request, item in _listing(
            rt, [endpoint], search_start(attempted), until, expand_payloads=True
        )
    ]
    return await match(endpoint, arguments, attempted, until, listed, taken)
