"""The final task of a run: delete fal's payloads of every verified request, report the rest.

Only ``archived`` records are deleted (their files are in the bucket, sizes verified, hashes in
the ledger); anything else is kept on fal and listed in the report, from which the retention scope builds
its :class:`~falflow.flows.summary.RunSummary` (and raises ``RunFailed`` when it is not ok).
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from falflow.tasks.models import JobRecord, JobState, utcnow
from falflow.tasks.platform import PlatformError
from falflow.tasks.runtime import Runtime, current_runtime, run_logger

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
    """Job ids whose payloads are gone from fal (now or in an earlier run)."""
    already_gone: list[str] = Field(default_factory=list)
    """Job ids fal answered 404 for (deleted before, e.g. by an earlier run)."""
    kept: list[KeptRequest] = Field(default_factory=list)
    """Not verified, so not deleted."""
    delete_failed: list[KeptRequest] = Field(default_factory=list)
    """Verified, but fal's deletion failed or was incomplete; the janitor retries them."""


async def cleanup(rt: Runtime, records: Sequence[JobRecord]) -> CleanupReport:
    """Delete the payloads of every ``archived`` record (paced, bounded, retried); keep the rest."""
    report = CleanupReport(run_key=rt.run_key)
    final: dict[str, JobRecord] = {}

    async def delete(record: JobRecord) -> None:
        final[record.job_id] = after = await delete_payloads(rt, record)
        if after.state is JobState.DELETED:
            report.deleted.append(after.job_id)
            if after.deletion is not None and after.deletion.already_gone:
                report.already_gone.append(after.job_id)
        else:
            report.delete_failed.append(_kept(after))

    async with anyio.create_task_group() as tg:
        for record in records:
            if record.state is JobState.ARCHIVED:
                tg.start_soon(delete, record)
            elif record.state is JobState.DELETED:
                final[record.job_id] = record
                report.deleted.append(record.job_id)
            else:
                final[record.job_id] = record
                report.kept.append(_kept(record))
    report.records = [final[r.job_id] for r in records]
    return report


async def delete_payloads(rt: Runtime, record: JobRecord) -> JobRecord:
    """Delete one verified request's payloads and output files on fal; record the answer.

    Returns the record ``deleted``, or still ``archived`` with ``error`` set if fal failed or
    could not delete some output file.
    """
    if not record.verified or record.request_id is None:
        raise ValueError(f"refusing to delete {record.job_id}: its archive is not verified")
    try:
        result = await rt.platform.delete_payloads(record.request_id)
    except PlatformError as exc:
        failed = record.model_copy(
            update={"error_type": "delete_failed", "error": rt.redact(str(exc))}
        )
        return await rt.ledger.put(failed)
    leftovers = [r for r in result.cdn_delete_results if r.get("exception")]
    if leftovers:
        failed = record.model_copy(
            update={
                "deletion": result,
                "error_type": "delete_incomplete",
                "error": rt.redact(
                    f"fal could not delete {len(leftovers)} output files (first: "
                    f"{str(leftovers[0].get('exception'))[:200]}); retried by the next cleanup"
                ),
            }
        )
        return await rt.ledger.put(failed)
    return await rt.ledger.put(
        record.moved_to(
            JobState.DELETED, deletion=result, deleted_at=utcnow(), error=None, error_type=None
        )
    )


@task(name="cleanup", cache_policy=NONE, persist_result=False)
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
        "cleanup of run %s: %d deleted from fal (%d already gone), %d kept, %d deletions failed",
        rt.run_key,
        len(report.deleted),
        len(report.already_gone),
        len(report.kept),
        len(report.delete_failed),
    )
    return report


def _kept(record: JobRecord) -> KeptRequest:
    reason = record.error or f"not archived (state {record.state.value})"
    return KeptRequest(
        job_id=record.job_id, request_id=record.request_id, state=record.state, reason=reason
    )
