"""Waiting for a request without a polling storm, and getting its result or its real error.

The status stream (server-sent events, one per change, closed at ``COMPLETED``) is followed when
fal offers it; otherwise, or after it drops, status is polled from ``limits.poll_interval_seconds``
backing off to ``limits.max_poll_interval_seconds``. fal's log lines go to the run logger at debug.
Cancelling the caller (a cancelled flow) asks fal to cancel the request before re-raising.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
from httpx_sse import SSEError, aconnect_sse
from prefect.logging.loggers import LoggingAdapter

from falflow.tasks.archive import save_error
from falflow.tasks.errors import JobFailed, describe_detail, detail_type
from falflow.tasks.http import from_ingress, request_with_retries
from falflow.tasks.models import JSON, Job, JobRecord, JobState, utcnow
from falflow.tasks.runtime import Runtime, run_logger
from falflow.tasks.shape import ShapeError
from falflow.tasks.submit import RequestUrls

STREAM_READ_TIMEOUT = 60.0
"""A silent status stream is re-opened after this long (after one status poll)."""
STREAM_DRAIN_SECONDS = 0.5
"""How long the end of a status stream is awaited after ``COMPLETED`` before it is dropped."""
CANCEL_TIMEOUT = 10.0
CANCELLED_ON_FAL = "client_cancelled"
"""fal's error type of a request a client cancelled."""
_BACKOFF = 1.5
_MAX_LOG_KEYS = 2000

Logger = logging.Logger | LoggingAdapter


class _WaitError(Exception):
    """Waiting broke on falflow's side (not fal's verdict): the record stays ``submitted``."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


async def wait(rt: Runtime, job: Job, record: JobRecord, urls: RequestUrls) -> JSON:
    """Wait for ``record``'s request to complete and return fal's output (an object: any other
    JSON value is returned as ``{"output": value}``).

    Raises:
        JobFailed: fal completed it with an error (record ``failed``, with fal's error type and
            message), or waiting broke (record stays ``submitted``, so a re-run resumes it).
    """
    log = run_logger()
    try:
        status = await _completed_status(rt, urls, log, job.job_id)
        response = await _get(rt, urls.response_url, retry_on=_not_the_result)
        if _not_the_result(response):
            raise _WaitError(
                f"http_{response.status_code}",
                f"fal's result call for request {urls.request_id} kept answering HTTP "
                f"{response.status_code} (rate limit or proxy); re-run with the same run key to "
                "fetch the result",
            )
    except _WaitError as exc:
        failed = record.model_copy(
            update={"error_type": exc.error_type, "error": rt.redact(str(exc))}
        )
        raise JobFailed(await rt.ledger.put(failed)) from None
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await _cancel(rt, record, urls, log)
        raise
    if status.get("error") or not response.is_success:
        failed = _failed(rt, record, status, response)
        failed = await save_error(rt, failed, _error_document(status, response))
        raise JobFailed(await rt.ledger.put(failed))
    try:
        output = response.json()
    except RecursionError:  # Python's JSON parser recurses once per level
        raise ShapeError("nested deeper than Python can parse") from None
    return output if isinstance(output, dict) else {"output": output}


async def _completed_status(rt: Runtime, urls: RequestUrls, log: Logger, job_id: str) -> JSON:
    """The request's ``COMPLETED`` status body (which carries ``error`` if it failed)."""
    limits = rt.settings.limits
    delay = limits.poll_interval_seconds
    seen: set[tuple[Any, Any]] = set()
    use_stream = True
    while True:
        if use_stream:
            try:
                completed = await _follow_stream(rt, urls, log, job_id, seen)
            except (SSEError, _StreamUnavailable):
                use_stream = False
            except httpx.TransportError:
                completed = None  # dropped: poll once, then re-open it
            else:
                if completed is not None:
                    return completed
        status = await _poll(rt, urls)
        _forward_logs(log, job_id, status, seen)
        if status.get("status") == "COMPLETED":
            return status
        await anyio.sleep(delay)
        delay = min(delay * _BACKOFF, limits.max_poll_interval_seconds)


class _StreamUnavailable(Exception):
    pass


async def _follow_stream(
    rt: Runtime, urls: RequestUrls, log: Logger, job_id: str, seen: set[tuple[Any, Any]]
) -> JSON | None:
    async with aconnect_sse(
        rt.http,
        "GET",
        urls.status_url + "/stream",
        params={"logs": "1"},
        headers=rt.fal_headers(),
        timeout=httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT),
    ) as source:
        if source.response.status_code in (404, 405, 501):
            raise _StreamUnavailable  # no such route here (an unknown request: the poll says so)
        if source.response.status_code != 200:
            return None  # throttled or a proxy error: poll once, then open it again
        events = source.aiter_sse()
        async for event in events:
            try:
                status = event.json()
            except ValueError:
                continue  # a comment or keep-alive
            if not isinstance(status, dict):
                continue
            _forward_logs(log, job_id, status, seen)
            if status.get("status") == "COMPLETED":
                # fal ends the stream here: reading to its end lets the connection be reused
                # (closing it unread costs a new TLS handshake for the next call).
                with anyio.move_on_after(STREAM_DRAIN_SECONDS):
                    async for _ in events:
                        pass
                return status
    return None


async def _poll(rt: Runtime, urls: RequestUrls) -> JSON:
    response = await _get(rt, urls.status_url, params={"logs": "1"})
    if response.status_code == 404:
        raise _WaitError(
            "request_not_found",
            f"fal does not know request {urls.request_id} (404): it expired or was never "
            "accepted; nothing to archive",
        )
    if response.status_code in (401, 403):
        raise _WaitError(
            "authorization_error",
            f"fal refused the key when asked about request {urls.request_id} "
            f"(HTTP {response.status_code}): check FAL_KEY, then re-run with the same run key",
        )
    if response.status_code not in (200, 202):
        raise _WaitError(
            f"http_{response.status_code}",
            f"fal's status call for request {urls.request_id} kept failing with HTTP "
            f"{response.status_code}; re-run with the same run key to resume waiting",
        )
    body = response.json()
    if not isinstance(body, dict):
        raise _WaitError("bad_status", f"fal's status for {urls.request_id} is not an object")
    return body


def _not_the_result(response: httpx.Response) -> bool:
    """A result call answered by fal's rate limiter or ingress proxy, not by the request: ask
    again. Any other answer is the result itself: a failed request's result is the model's own
    error (e.g. a 500 ``runner_server_error``, or a 503 of the model), the same on every call,
    so retrying it only delays and can end on a proxy error instead."""
    return response.status_code in (408, 429) or from_ingress(response)


async def _get(rt: Runtime, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return await request_with_retries(rt.http, "GET", url, headers=rt.fal_headers(), **kwargs)
    except httpx.TransportError as exc:
        raise _WaitError(
            "connection_error",
            f"could not reach fal's queue ({type(exc).__name__}: {exc}); re-run with the same "
            "run key to resume waiting",
        ) from None


def _error_document(status: JSON, response: httpx.Response) -> JSON:
    """What fal said of a failed request: its COMPLETED status (error, error type, logs) and the
    result call's answer."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:100_000]
    kept = {k: v for k, v in status.items() if not k.endswith("_url")}
    return {"status": kept, "result": {"status_code": response.status_code, "body": body}}


def _failed(rt: Runtime, record: JobRecord, status: JSON, response: httpx.Response) -> JobRecord:
    """The record of a request fal completed with an error, with fal's own type and message."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    error_type = (
        status.get("error_type")
        or detail_type(detail)
        or (body.get("error_type") if isinstance(body, dict) else None)
        or response.headers.get("x-fal-error-type")
        or f"http_{response.status_code}"
    )
    message = describe_detail(detail) if detail else str(status.get("error") or response.text[:300])
    return record.moved_to(
        JobState.FAILED,
        error_type=str(error_type),
        error=rt.redact(message),  # the record holds the request id
        finished_at=utcnow(),
    )


async def _cancel(rt: Runtime, record: JobRecord, urls: RequestUrls, log: Logger) -> None:
    """Ask fal to cancel (shielded by the caller); the record stays ``submitted`` with a note, so a
    re-run learns whether the request finished anyway (a running one may)."""
    answer = "no answer"
    with anyio.move_on_after(CANCEL_TIMEOUT):
        try:
            response = await rt.http.put(urls.cancel_url, headers=rt.fal_headers())
            answer = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
    log.warning(
        "%s: flow cancelled; asked fal to cancel %s (%s)", record.job_id, urls.request_id, answer
    )
    with anyio.move_on_after(CANCEL_TIMEOUT):
        await rt.ledger.put(
            record.model_copy(
                update={
                    "error_type": "cancelled",
                    "error": f"the flow was cancelled; fal was asked to cancel ({answer})",
                    "cancel_requested_at": utcnow(),
                }
            )
        )


def cancelled_by_falflow(record: JobRecord) -> bool:
    """fal failed the request as cancelled after falflow had asked it to: nothing was generated,
    so the job is worth submitting again once this request is gone from fal."""
    return (
        record.state is JobState.FAILED
        and record.error_type == CANCELLED_ON_FAL
        and record.cancel_requested_at is not None
    )


def _forward_logs(log: Logger, job_id: str, status: JSON, seen: set[tuple[Any, Any]]) -> None:
    """Send fal's new log lines to the run logger at debug (statuses repeat earlier lines)."""
    for entry in status.get("logs") or ():
        if not isinstance(entry, dict):
            continue
        key = (entry.get("timestamp"), entry.get("message"))
        if key in seen or len(seen) >= _MAX_LOG_KEYS:
            continue
        seen.add(key)
        log.debug("%s fal: %s", job_id, str(entry.get("message"))[:1000])
