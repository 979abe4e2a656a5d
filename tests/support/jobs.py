"""Running many jobs at once on one runtime, the way lanes do, for tests of ``run_job`` itself."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from falflow.tasks.jobs import JobFailed, JobOutcome, run_job
from falflow.tasks.models import Job
from falflow.tasks.runtime import Runtime


async def run_jobs(rt: Runtime, jobs: Sequence[Job]) -> tuple[list[JobOutcome], list[JobFailed]]:
    """Every job concurrently to the end: outcomes in job order, and the jobs that failed.

    Any other error is raised once every job has stopped (as an ExceptionGroup when several).
    """
    outcomes: dict[int, JobOutcome] = {}
    failures: list[JobFailed] = []
    errors: list[Exception] = []

    async def one(index: int, job: Job) -> None:
        try:
            outcomes[index] = await run_job(rt, job)
        except JobFailed as exc:
            failures.append(exc)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for index, job in enumerate(jobs):
            tg.start_soon(one, index, job)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"{len(errors)} jobs stopped on unexpected errors", errors)
    return [outcomes[i] for i in sorted(outcomes)], failures
