"""A job end to end (submit → wait → archive), resuming from the ledger.

Resuming: a job with a ledger record is never submitted again. ``submitted`` waits on the
recorded request, ``completed`` archives from ``output.json``, ``archived``/``deleted`` only
return the output, ``failed`` raises again (unless fal failed it on an input falflow had
deleted: then it is submitted again with the input served anew, :mod:`falflow.tasks.reserve`;
or fal cancelled it at falflow's request: then it is submitted again once deleted from fal);
a submit whose outcome is unknown is reconciled
through the Platform API listing, and submitted again only once proven never to have reached fal
(``never_submitted``). Jobs run in lanes (:mod:`falflow.tasks.lanes`).
"""

from __future__ import annotations

from pydantic import BaseModel

from falflow.tasks.archive import archive, load_output, save_input, save_output
from falflow.tasks.cleanup import cleanup, gone_from_fal
from falflow.tasks.errors import JobFailed
from falflow.tasks.models import JSON, Job, JobRecord, JobState, utcnow
from falflow.tasks.reserve import dead_inputs, failed_on_a_dead_input
from falflow.tasks.runtime import Runtime, run_logger
from falflow.tasks.shape import ShapeError, check_shape
from falflow.tasks.signing import unsigned
from falflow.tasks.submit import RequestUrls, reconcile_submit, submit
from falflow.tasks.wait import cancelled_by_falflow, wait

__all__ = ["JobFailed", "JobOutcome", "run_job"]

_TO_SUBMIT_OR_WAIT = frozenset(
    {JobState.PENDING, JobState.SUBMIT_UNKNOWN, JobState.NEVER_SUBMITTED, JobState.SUBMITTED}
)


class JobOutcome(BaseModel):
    record: JobRecord
    output: JSON | None
    """fal's output with fal's URLs (for later steps); None only if there is no output."""


async def run_job(rt: Runtime, job: Job, *, resubmit_cancelled: bool = True) -> JobOutcome:
    """Submit, wait for and archive ``job``, or resume it from its ledger record.

    A request that fal failed as cancelled because falflow asked it to (its run was cancelled
    mid-wait) generated nothing: its fal copy is deleted and the job submitted again, unless
    ``resubmit_cancelled`` is false (the janitor finishes runs but starts nothing new).

    An archive that cannot be verified is not an exception: the outcome's record stays
    ``completed`` with ``error`` set, and cleanup keeps it (never deletes it).

    Raises:
        JobFailed: fal failed the request, refused the submit, or the submit's outcome is unknown.
    """
    record = await rt.ledger.get(rt.run_key, job.job_id)
    if record is None:
        record = JobRecord(
            job_id=job.job_id, run_key=rt.run_key, endpoint=job.endpoint, policy=job.policy
        )
    elif record.endpoint != job.endpoint:
        raise ValueError(
            f"job id {job.job_id} of run {rt.run_key} was {record.endpoint} and is now "
            f"{job.endpoint}: job ids must be stable across re-runs (see job_id_for)"
        )
    if record.state is JobState.FAILED:
        if resubmit_cancelled and cancelled_by_falflow(record) and gone_from_fal(record):
            why = "cancelled on fal by falflow when its run stopped"
        elif failed_on_a_dead_input(record) and await dead_inputs(rt, job.arguments):
            why = "failed on an input falflow deleted"  # not this job's failure
        else:
            raise JobFailed(record)
        run_logger().info("%s: %s; submitting it again", job.job_id, why)
        record = record.moved_to(
            JobState.PENDING,
            request_id=None,
            submit_attempted_at=None,
            submitted_at=None,
            finished_at=None,
            deletion=None,
            error=None,
            error_type=None,
            cancel_requested_at=None,
        )
    if record.state in _TO_SUBMIT_OR_WAIT:
        try:
            async with rt.in_flight, rt.account_slot():
                if record.submit_unknown:
                    record = await reconcile_submit(rt, job, record)
                if record.request_id is None:  # never sent, or proven never to have reached fal
                    record, urls = await submit(rt, job, await save_input(rt, job, record))
                else:
                    urls = RequestUrls.build(
                        rt.settings.fal.queue_host, job.endpoint, record.request_id
                    )
                try:
                    output = await wait(rt, job, record, urls)
                    check_shape(output)
                except ShapeError as exc:
                    return JobOutcome(record=await _refuse_output(rt, record, exc), output=None)
        except JobFailed as failure:
            if not (resubmit_cancelled and cancelled_by_falflow(failure.record)):
                raise
            return await _again_once_deleted(rt, job, failure.record)
        # a model may echo its (signed) inputs: signatures are credentials, never kept
        output = unsigned(output, rt.settings.fal.cdn_hosts)
        record = await save_output(rt, record, output)
    elif record.output_key is None:  # refused before it was stored: kept on fal, as recorded
        return JobOutcome(record=record, output=None)
    else:
        output = await load_output(rt, record)
    if not record.verified:
        record = await archive(rt, record, output)
    return JobOutcome(record=record, output=output)


async def _again_once_deleted(rt: Runtime, job: Job, record: JobRecord) -> JobOutcome:
    """Delete fal's copy of a request falflow had fal cancel (its input and fal's error are
    archived), then submit the job again; unless the deletion is confirmed the failure stands
    (the request would lose its only ledger record), and a later resume tries again."""
    [after] = (await cleanup(rt, [record])).records
    if not gone_from_fal(after):
        raise JobFailed(after)
    return await run_job(rt, job)


async def _refuse_output(rt: Runtime, record: JobRecord, problem: ShapeError) -> JobRecord:
    """Record an output falflow will not store or walk (too deep, too large): the request is
    finished on fal but not archived, so it is kept there and the reason is in the ledger."""
    run_logger().warning("%s: fal's output refused: %s", record.job_id, problem)
    return await rt.ledger.put(
        record.moved_to(
            JobState.COMPLETED,
            finished_at=utcnow(),
            error_type="archive_refused",
            error=(
                f"fal's output is {problem}: falflow does not store or walk such an output "
                "(the request is kept on fal, not deleted)"
            ),
        )
    )
