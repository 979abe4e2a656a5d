"""A job end to end (submit → wait → archive), resuming from the ledger, and its batch task.

Resuming: a job with a ledger record is never submitted again. ``submitted`` waits on the
recorded request, ``completed`` archives from ``output.json``, ``archived``/``deleted`` only
return the output, ``failed`` raises again; a submit whose outcome is unknown is reconciled
through the Platform API listing. One Prefect task run handles a batch of jobs (the OSS server
loses task runs past ~5,000 queued events), the jobs inside it run concurrently on one loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from tasks.archive import archive, load_output, save_input, save_output
from tasks.errors import JobFailed
from tasks.models import JSON, Job, JobRecord, JobState
from tasks.report import batch_summary
from tasks.runtime import Runtime, current_runtime, run_logger
from tasks.submit import RequestUrls, reconcile_submit, submit
from tasks.wait import wait

__all__ = ["JobFailed", "JobOutcome", "JobsFailed", "run_job", "run_jobs", "run_jobs_task"]

_LISTED_FAILURES = 10


class JobOutcome(BaseModel):
    record: JobRecord
    output: JSON | None
    """fal's output with fal's URLs (for later steps); None only if there is no output."""


class JobsFailed(Exception):
    """Some jobs of a batch failed; the others' outcomes are in ``outcomes``."""

    def __init__(self, outcomes: list[JobOutcome], failures: list[JobFailed]) -> None:
        self.outcomes = outcomes
        self.failures = failures
        listed = "\n".join(f"  - {f}" for f in failures[:_LISTED_FAILURES])
        more = len(failures) - _LISTED_FAILURES
        super().__init__(
            f"{len(failures)} of {len(failures) + len(outcomes)} requests failed:\n{listed}"
            + (f"\n  … and {more} more (see the ledger)" if more > 0 else "")
        )

    def __reduce__(self) -> tuple[type[JobsFailed], tuple[list[JobOutcome], list[JobFailed]]]:
        return (type(self), (self.outcomes, self.failures))


async def run_job(rt: Runtime, job: Job) -> JobOutcome:
    """Submit, wait for and archive ``job``, or resume it from its ledger record.

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
            f"{job.endpoint}: job ids must be stable across re-runs (use Job.make_id)"
        )
    if record.state is JobState.FAILED:
        raise JobFailed(record)
    if record.state in (JobState.PENDING, JobState.SUBMIT_UNKNOWN, JobState.SUBMITTED):
        async with rt.in_flight:
            if record.state is JobState.PENDING and record.submit_attempted_at is None:
                record, urls = await submit(rt, job, await save_input(rt, job, record))
            else:
                if record.request_id is None:  # the last submit's outcome is unknown
                    record = await reconcile_submit(rt, job, record)
                assert record.request_id is not None  # reconcile_submit raises otherwise
                urls = RequestUrls.build(
                    rt.settings.fal.queue_host, job.endpoint, record.request_id
                )
            output = await wait(rt, job, record, urls)
        record = await save_output(rt, record, output)
    else:
        output = await load_output(rt, record)
    if not record.verified:
        record = await archive(rt, record, output)
    return JobOutcome(record=record, output=output)


async def run_jobs(rt: Runtime, jobs: Sequence[Job]) -> tuple[list[JobOutcome], list[JobFailed]]:
    """Run ``jobs`` concurrently to the end; outcomes in job order, and the jobs that failed.

    Any other error (a bucket that cannot be written, a bug) is raised once every job has
    stopped, so no request is abandoned mid-way.
    """
    await rt.progress.expect(len(jobs))
    outcomes: dict[int, JobOutcome] = {}
    failures: list[JobFailed] = []
    errors: list[Exception] = []

    async def one(index: int, job: Job) -> None:
        try:
            outcomes[index] = await run_job(rt, job)
        except JobFailed as exc:
            run_logger().warning("%s", exc)
            failures.append(exc)
        except Exception as exc:
            errors.append(exc)
        await rt.progress.finished()

    async with anyio.create_task_group() as tg:
        for index, job in enumerate(jobs):
            tg.start_soon(one, index, job)
    records = [o.record for o in outcomes.values()] + [f.record for f in failures]
    run_logger().info("%s", batch_summary(len(jobs), records))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"{len(errors)} jobs stopped on unexpected errors", errors)
    return [outcomes[i] for i in sorted(outcomes)], failures


@task(name="run-jobs", cache_policy=NONE, persist_result=False)
async def run_jobs_task(jobs: list[Job]) -> list[JobOutcome]:
    """One Prefect task run for a batch of jobs (``limits.jobs_per_task_run`` of them).

    No Prefect caching: resuming is the ledger's job (a cache keyed on task source would
    re-submit every unfinished job after a code deploy).

    Raises:
        JobsFailed: after every job of the batch finished, if any failed.
    """
    outcomes, failures = await run_jobs(current_runtime(), jobs)
    if failures:
        raise JobsFailed(outcomes, failures)
    return outcomes
