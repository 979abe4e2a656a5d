"""The final task of a run: delete fal's payloads of every verified request, confirm, report.

Only verified records are deleted (their files are in the bucket, sizes verified, hashes in the
ledger), and a deletion counts only once confirmed: fal's answer proves nothing by itself, so
fal's listing must show no stored payload and every output URL must stop serving. Anything else
is kept on fal and listed in the report, from which the retention scope builds its
:class:`~falflow.flows.summary.RunSummary` (and raises ``RunFailed`` when it is not ok).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import anyio
import httpx
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from falflow.tasks.http import request_with_retries
from falflow.tasks.lost import SUBMIT_SKEW
from falflow.tasks.models import DeletionResult, JobRecord, JobState, utcnow
from falflow.tasks.outputs import OutputRefused
from falflow.tasks.platform import PlatformError
from falflow.tasks.runtime import Runtime, current_runtime, run_logger
from falflow.tasks.signing import signed_url

_LISTED = 20


class KeptRequest(BaseModel):
    """A request cleanup did not delete, and why."""

    job_id: str
    request_id: str | None
    state: JobState | None
    """None: the job has no ledger record (it never started)."""
    reason: str


class CleanupReport(BaseModel):
    run_key: str
    records: list[JobRecord] = Field(default_factory=list)
    """Every record considered, as it stands after cleanup."""
    deleted: list[str] = Field(default_factory=list)
    """Job ids confirmed gone from fal (now or in an earlier run), or ``expiring``: nothing left
    but hidden files that expire."""
    kept: list[KeptRequest] = Field(default_factory=list)
    """Not verified, so not deleted."""
    delete_failed: list[KeptRequest] = Field(default_factory=list)
    """Verified, but fal's deletion failed or is not confirmed; the janitor retries them."""


CONFIRM_ATTEMPTS = 4
"""Deletion attempts per request in one cleanup before it is left ``delete_unconfirmed``."""
CONFIRM_WAIT_SECONDS = 2.0
"""First wait before another attempt; it doubles (fal's listing and payload rows lag completion)."""
PLATFORM_FAILED = 0
"""A deletion's ``status_code`` when fal's Platform API itself refused or kept failing."""
GONE_STATUSES = frozenset({404, 410})
"""What a HEAD of an output file fal no longer has answers (403 is "not public")."""


async def cleanup(rt: Runtime, records: Sequence[JobRecord]) -> CleanupReport:
    """Delete from fal every verified record not yet confirmed gone (paced, bounded, retried,
    confirmed); keep the rest.

    Rounds, a few seconds apart (a request that just completed may not be listed, or deletable,
    for a moment): each asks fal to delete what is not confirmed yet, then reads fal's listing
    once per endpoint (not once per request: the Platform API is rate-limited) and probes every
    output URL.
    """
    report = CleanupReport(run_key=rt.run_key)
    final = {record.job_id: record for record in records}
    pending = [record for record in records if record.needs_deletion]
    wait = CONFIRM_WAIT_SECONDS
    for round_ in range(CONFIRM_ATTEMPTS):
        if not pending:
            break
        if round_:
            await anyio.sleep(wait)
            wait *= 2
        for record in await delete_round(rt, pending):
            final[record.job_id] = record
        pending = [
            after
            for after in (final[r.job_id] for r in pending)
            if after.needs_deletion  # not confirmed yet: again, unless fal's API refused
            and (after.deletion is None or after.deletion.status_code != PLATFORM_FAILED)
        ]
    report.records = [final[r.job_id] for r in records]
    for record in report.records:
        if gone_from_fal(record):
            report.deleted.append(record.job_id)
        elif record.needs_deletion:
            report.delete_failed.append(_kept(record))
        else:
            report.kept.append(_kept(record))
    return report


def gone_from_fal(record: JobRecord) -> bool:
    """Confirmed deleted from fal (a failed request stays ``failed``, with its deletion), or
    ``expiring``: nothing left on fal but hidden files that expire."""
    if record.state in (JobState.DELETED, JobState.EXPIRING):
        return True
    return record.deletion is not None and record.deletion.confirmed_at is not None


async def delete_round(rt: Runtime, records: Sequence[JobRecord]) -> list[JobRecord]:
    """One attempt for each of ``records``: ask fal to delete, then check what fal still holds.

    A record becomes ``deleted`` only when fal's listing shows no stored payload and no output
    URL serves any more; ``expiring`` when what fal could not delete is hidden and has a TTL
    (``store_io = false`` leaves fal no payload through which to find the files); else
    ``delete_unconfirmed`` with what was seen, for the next attempt.
    """
    for record in records:
        if not record.needs_deletion or record.request_id is None:
            raise ValueError(f"refusing to delete {record.job_id}: its archive is not verified")
    answers: dict[str, DeletionResult | PlatformError] = {}

    async def ask(record: JobRecord) -> None:
        assert record.request_id is not None
        attempt = record.deletion.attempt + 1 if record.deletion is not None else 1
        try:
            answers[record.job_id] = await rt.platform.delete_payloads(record.request_id, attempt)
        except PlatformError as exc:
            answers[record.job_id] = exc

    async with anyio.create_task_group() as tg:
        for record in records:
            tg.start_soon(ask, record)
    asked = [r for r in records if isinstance(answers[r.job_id], DeletionResult)]
    listed: dict[str, str] = {}
    listing_error: PlatformError | None = None
    try:
        listed = await _listing(rt, asked)
    except PlatformError as exc:
        listing_error = exc
    settled: dict[str, JobRecord] = {}

    async def settle(record: JobRecord) -> None:
        answer = answers[record.job_id]
        if isinstance(answer, DeletionResult) and listing_error is None:
            answer.listing = listed.get(record.request_id or "", "not listed")
            settled[record.job_id] = await _settle(rt, record, answer)
            return
        error = answer if isinstance(answer, PlatformError) else listing_error
        attempt = record.deletion.attempt + 1 if record.deletion is not None else 1
        if isinstance(answer, DeletionResult):
            attempt = answer.attempt
        failed = DeletionResult(
            status_code=PLATFORM_FAILED, attempt=attempt, problem=rt.redact(str(error))
        )
        settled[record.job_id] = await rt.ledger.put(_unconfirmed(record, failed, "delete_failed"))

    async with anyio.create_task_group() as tg:
        for record in records:
            tg.start_soon(settle, record)
    return [settled[r.job_id] for r in records]


async def _listing(rt: Runtime, records: Sequence[JobRecord]) -> dict[str, str]:
    """Per request id: what fal's listing shows (``no stored payload`` or ``payload stored``);
    one listing per endpoint, over the window the requests were sent in."""
    shown: dict[str, str] = {}
    by_endpoint: dict[str, list[JobRecord]] = {}
    for record in records:
        by_endpoint.setdefault(record.endpoint, []).append(record)
    for endpoint, group in by_endpoint.items():
        sent = [r.submitted_at for r in group if r.submitted_at is not None]
        since = min(sent) - SUBMIT_SKEW if len(sent) == len(group) else None
        wanted = {r.request_id for r in group}
        shown.update(
            (request_id, state)
            for request_id, state in (
                await rt.platform.stored_payloads(endpoint, since=since, request_ids=wanted)
            ).items()
        )
    return shown


async def _settle(rt: Runtime, record: JobRecord, result: DeletionResult) -> JobRecord:
    """Probe the output URLs, hide what fal could not delete, and record the outcome."""
    urls = sorted({o.source_url for o in record.objects})
    hidden_before = set(record.deletion.hidden) if record.deletion is not None else set()
    result.urls = {url: await _probe(rt, url, signed=url in hidden_before) for url in urls}
    left = [url for url, status in result.urls.items() if not _gone(status)]
    result.hidden = sorted(hidden_before & set(left))
    if left and result.listing == "no stored payload":
        try:
            for url in left:
                if url in result.hidden:
                    continue
                if await rt.platform.set_file_acl(url, "hide"):
                    result.hidden.append(url)
                else:
                    result.urls[url] = "404 (fal has no such file)"
        except PlatformError as exc:
            run_logger().warning("%s: could not hide its files on fal: %s", record.job_id, exc)
    served = [url for url in left if url not in result.hidden and not _gone(result.urls[url])]
    if result.listing == "no stored payload" and not served and not result.hidden:
        result.confirmed_at = utcnow()
        if record.state is JobState.FAILED:  # it stays failed: its deletion is recorded
            return await rt.ledger.put(
                record.model_copy(update={"deletion": result, "deleted_at": result.confirmed_at})
            )
        return await rt.ledger.put(
            record.moved_to(
                JobState.DELETED, deletion=result, deleted_at=utcnow(), error=None, error_type=None
            )
        )
    ttl = record.policy.media_ttl_seconds
    if (
        result.listing == "no stored payload"
        and not served
        and ttl is not None
        and record.state is not JobState.FAILED
    ):
        ends = (record.finished_at or record.submitted_at or utcnow()) + timedelta(seconds=ttl)
        return await rt.ledger.put(
            record.moved_to(
                JobState.EXPIRING, deletion=result, expires_at=ends, error=None, error_type=None
            )
        )
    why = [f"fal answered {result.status_code}"] if result.status_code != 200 else []
    if result.listing != "no stored payload":
        why.append(f"fal's listing: {result.listing}")
    if served:
        why.append(f"{len(served)} output URLs still serve")
    if result.hidden and not served:
        why.append(f"{len(result.hidden)} files hidden, not deleted, and they never expire")
    leftovers = [r for r in result.cdn_delete_results if r.get("exception")]
    if leftovers:
        first = str(leftovers[0].get("exception"))[:120]
        why.append(f"fal could not delete {len(leftovers)} files ({first})")
    result.problem = rt.redact("deletion not confirmed: " + "; ".join(why) + "; retried later")
    return await rt.ledger.put(_unconfirmed(record, result, "delete_unconfirmed"))


def _unconfirmed(record: JobRecord, deletion: DeletionResult, error_type: str) -> JobRecord:
    """``record`` after an attempt that did not confirm its deletion: ``delete_unconfirmed``
    (a failed request stays ``failed``; its deletion says what was seen)."""
    if record.state is JobState.FAILED:
        return record.model_copy(update={"deletion": deletion})
    return record.moved_to(
        JobState.DELETE_UNCONFIRMED,
        deletion=deletion,
        error_type=error_type,
        error=deletion.problem,
    )


async def _probe(rt: Runtime, url: str, *, signed: bool) -> str:
    """Whether fal still has the file at ``url``: a HEAD's status code (or what went wrong).
    An anonymous 403 only says the file is not public, and a file falflow hid answers 404 to
    anyone: those are asked again through a signed URL, which answers 404 only for a file that
    is gone."""
    status = "403" if signed else await _get_status(rt, url)
    if status != "403":
        return status
    try:
        signed_status = await _get_status(rt, await signed_url(rt, url, 60))
    except (PlatformError, OutputRefused) as exc:
        return f"403 (could not sign to check: {type(exc).__name__})"
    return f"{signed_status} signed"


async def _get_status(rt: Runtime, url: str) -> str:
    try:
        async with rt.downloads:
            response = await request_with_retries(rt.http, "HEAD", url, attempts=4)
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}"
    return str(response.status_code)


def _gone(status: str) -> bool:
    code = status.split(" ", 1)[0]
    return code.isdigit() and int(code) in GONE_STATUSES


@task(name="cleanup", task_run_name="cleanup", cache_policy=NONE, persist_result=False)
async def cleanup_task(job_ids: list[str]) -> CleanupReport:
    """The run's final task: delete fal's copy of every verified archive, report the rest.

    Run it after every step that might still read a fal URL; records are read from the ledger.
    It does not raise for what it kept: the scope's summary reports it.
    """
    rt = current_runtime()
    found: dict[str, JobRecord | None] = {}

    async def read(job_id: str) -> None:
        found[job_id] = await rt.ledger.get(rt.run_key, job_id)

    unique = list(dict.fromkeys(job_ids))
    async with anyio.create_task_group() as tg:
        for job_id in unique:
            tg.start_soon(read, job_id)
    report = await cleanup(rt, [r for r in (found[j] for j in unique) if r is not None])
    report.kept.extend(
        KeptRequest(job_id=j, request_id=None, state=None, reason="no ledger record: never started")
        for j in unique
        if found[j] is None
    )
    run_logger().info(
        "cleanup of run %s: %d deleted from fal (confirmed), %d kept, %d deletions not confirmed",
        rt.run_key,
        len(report.deleted),
        len(report.kept),
        len(report.delete_failed),
    )
    return report


def _kept(record: JobRecord) -> KeptRequest:
    problem = record.deletion.problem if record.deletion is not None else None
    reason = problem or record.error or f"not archived (state {record.state.value})"
    return KeptRequest(
        job_id=record.job_id, request_id=record.request_id, state=record.state, reason=reason
    )
