"""Submitting a job under its retention policy, without ever sending the same request twice.

The order is what makes re-runs safe: the record is written with ``submit_attempted_at`` before
the POST, and with the request id right after it.

falflow POSTs the submit itself rather than through ``fal_client``: ``fal_client`` re-POSTs
after any transport error (a reset after fal queued the request, or a read timeout when no start
timeout is set), and each re-POST can be a second billed request. Here a submit is retried only
when it provably never reached fal (no connection, or a 429 / proxy 503 answer); when the answer
is lost after sending, the job is ``submit_unknown`` and reconciled through the Platform API
listing, never re-sent. The policy's start deadline (``X-Fal-Request-Timeout``) goes with every
submit unless the policy sets none: fal never starts a request after it, which bounds how long
a lost submit can stay unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fal_client.client import AppId

from falflow.settings import RetentionPolicy
from falflow.tasks.errors import JobFailed, describe_detail
from falflow.tasks.http import (
    backoff_seconds,
    from_ingress,
    retry_after_seconds,
)
from falflow.tasks.lost import LISTING_LAG, past_start_deadline, search, search_start
from falflow.tasks.models import JSON, Job, JobRecord, JobState, utcnow
from falflow.tasks.platform import PlatformError
from falflow.tasks.reserve import live_arguments
from falflow.tasks.runtime import Runtime, run_logger
from falflow.tasks.signing import INPUT_READ_SECONDS, sign_inputs

SUBMIT_ATTEMPTS = 8
SUBMIT_TIMEOUT = httpx.Timeout(30.0, read=120.0)
RECONCILE_PAUSE_SECONDS = 2.0
"""Between two searches of fal's listing for a lost submit's request, while it may lag."""
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class RequestUrls:
    """Where fal answers about one request: built from the configured queue host, so fal's key is
    only ever sent there (not to URLs taken from an answer)."""

    request_id: str
    response_url: str
    status_url: str
    cancel_url: str

    @classmethod
    def build(cls, queue_host: str, endpoint: str, request_id: str) -> RequestUrls:
        app = AppId.from_endpoint_id(endpoint)
        prefix = f"{app.namespace}/" if app.namespace else ""
        base = f"https://{queue_host}/{prefix}{app.owner}/{app.alias}/requests/{request_id}"
        return cls(request_id, base, base + "/status", base + "/cancel")


def submit_headers(policy: RetentionPolicy) -> dict[str, str]:
    """Every policy header a submit carries (the ledger's ``headers_sent``; no Authorization).
    Without a start deadline no ``X-Fal-Request-Timeout`` is sent (fal's own default applies)."""
    headers = {**policy.headers(), "X-Fal-Queue-Priority": policy.priority}
    if policy.start_timeout_seconds is not None:
        headers["X-Fal-Request-Timeout"] = str(policy.start_timeout_seconds)
    return headers


async def submit(rt: Runtime, job: Job, record: JobRecord) -> tuple[JobRecord, RequestUrls]:
    """Submit ``job`` once; its request id is in the ledger before this returns.

    Raises:
        JobFailed: fal refused the submit (record ``failed``), or its answer was lost and the
            listing does not show it (record ``submit_unknown``: never re-sent).
    """
    record = await rt.ledger.put(
        record.model_copy(
            update={
                "submit_attempted_at": utcnow(),
                "headers_sent": submit_headers(job.policy),
                "error": None,
                "error_type": None,
            }
        )
    )
    arguments, record = await live_arguments(rt, record, job.arguments)
    try:
        response = await _post(rt, job, arguments)
    except httpx.TransportError as exc:
        lost = record.moved_to(
            JobState.SUBMIT_UNKNOWN,
            error_type="submit_outcome_unknown",
            error=rt.redact(f"the answer to the submit was lost ({type(exc).__name__}: {exc})"),
        )
        record = await reconcile_submit(rt, job, await rt.ledger.put(lost))
        assert record.request_id is not None  # just sent: its deadline cannot have passed
        return record, RequestUrls.build(
            rt.settings.fal.queue_host, job.endpoint, record.request_id
        )
    body = _json(response)
    request_id = body.get("request_id")
    if not response.is_success or not isinstance(request_id, str):
        detail = body.get("detail") or response.text[:300]
        refused = record.moved_to(
            JobState.FAILED,
            error_type=str(
                body.get("error_type")
                or response.headers.get("x-fal-error-type")
                or f"http_{response.status_code}"
            ),
            error=rt.redact(
                f"fal refused the submit with HTTP {response.status_code}: "
                f"{describe_detail(detail)}"
            ),
            finished_at=utcnow(),
        )
        raise JobFailed(await rt.ledger.put(refused))
    record = await rt.ledger.put(
        record.moved_to(JobState.SUBMITTED, request_id=request_id, submitted_at=utcnow())
    )
    run_logger().debug("%s: submitted to %s as %s", job.job_id, job.endpoint, request_id)
    return record, RequestUrls.build(rt.settings.fal.queue_host, job.endpoint, request_id)


async def _post(rt: Runtime, job: Job, arguments: JSON) -> httpx.Response:
    """POST the submit, retrying only what provably did not reach fal's queue."""
    url = f"https://{rt.settings.fal.queue_host}/{job.endpoint}"
    headers = {**rt.fal_headers(), **submit_headers(job.policy)}
    if job.policy.private_outputs:  # earlier steps' outputs are not public: hand fal signed URLs
        valid = int((job.policy.start_timeout_seconds or 24 * 3600) + INPUT_READ_SECONDS)
        arguments = await sign_inputs(rt, arguments, valid)
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        try:
            response = await rt.http.post(
                url, json=arguments, headers=headers, timeout=SUBMIT_TIMEOUT
            )
        except _NEVER_SENT:
            if attempt == SUBMIT_ATTEMPTS:
                raise
            await anyio.sleep(backoff_seconds(attempt))
            continue
        if attempt == SUBMIT_ATTEMPTS or not _not_queued(response):
            return response
        delay = retry_after_seconds(response)
        await anyio.sleep(backoff_seconds(attempt) if delay is None else delay)
    raise AssertionError("unreachable: the loop returns or raises on its last attempt")


def _not_queued(response: httpx.Response) -> bool:
    """An answer that says the request was not queued and may be sent again: 429 (rate or queue
    limit) or the ingress proxy's 503 (it never reached fal; a 502/504 may have been forwarded)."""
    return response.status_code == 429 or from_ingress(response, codes=(503,))


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def reconcile_submit(rt: Runtime, job: Job, record: JobRecord) -> JobRecord:
    """Find the request a lost submit may have created, via fal's request listing.

    The one request on ``job.endpoint`` sent since the attempt whose stored input equals
    ``job.arguments`` and which no other record of this run owns (the rule of
    :func:`falflow.tasks.lost.match`) is adopted (record ``submitted``). While the listing may
    still lag the attempt (``LISTING_LAG``), finding nothing is asked again.

    Returns the record ``submitted``, or ``never_submitted`` when no request matches although
    fal could no longer start one (:func:`falflow.tasks.lost.past_start_deadline`): the caller
    submits it again.

    Raises:
        JobFailed: several matches, or none yet (record ``submit_unknown``, with what to do next).
    """
    attempted = record.submit_attempted_at or utcnow()
    since = search_start(attempted)

    async def taken(request_id: str) -> bool:
        owner = await rt.ledger.owner_of(rt.run_key, request_id)
        return owner is not None and owner != job.job_id

    reason = ""
    first = True
    # without stored inputs (store_io off) nothing can ever match: one look says so
    while first or (job.policy.store_io and utcnow() < attempted + LISTING_LAG):
        if not first:
            await anyio.sleep(RECONCILE_PAUSE_SECONDS)
        first = False
        try:
            matches = [
                r.request_id
                for r in await search(rt, job.endpoint, job.arguments, attempted, taken)
            ]
        except PlatformError as exc:
            reason = f"the Platform API listing failed ({exc})"
            continue
        if len(matches) == 1:
            run_logger().info(
                "%s: found the request of a lost submit on fal: %s", job.job_id, matches[0]
            )
            return await rt.ledger.put(
                record.moved_to(
                    JobState.SUBMITTED,
                    request_id=matches[0],
                    submitted_at=attempted,
                    error=None,
                    error_type=None,
                )
            )
        when = f"{since:%Y-%m-%d %H:%M:%S}Z"
        reason = (
            f"{len(matches)} requests on fal match its input since {when}"
            if matches
            else f"no request on fal matches its input since {when}"
            + (
                ""
                if job.policy.store_io
                else " (with X-Fal-Store-IO: 0 fal keeps no input to match)"
            )
        )
        if matches:
            break
    if reason.startswith("no request") and past_start_deadline(job.policy, attempted, utcnow()):
        run_logger().info(
            "%s: its lost submit never reached fal (start deadline passed, not listed): "
            "submitting it again",
            job.job_id,
        )
        return await rt.ledger.put(
            record.moved_to(
                JobState.NEVER_SUBMITTED,
                error_type="never_submitted",
                error="the submit never reached fal: its start deadline passed and fal lists "
                "no request with its input; submitted again",
            )
        )
    unknown = record.moved_to(
        JobState.SUBMIT_UNKNOWN,
        error_type="submit_outcome_unknown",
        error=rt.redact(
            f"the outcome of a submit is unknown and {reason}. falflow never re-sends such a "
            "submit: check fal's dashboard, then delete the ledger record "
            f"{rt.ledger.key(record.run_key, record.job_id)} to submit it again"
        ),
    )
    raise JobFailed(await rt.ledger.put(unknown))
