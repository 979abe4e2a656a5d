"""The retention flow: independent fal requests through submit → wait → archive, then cleanup.

    from flows.retention import run_requests

    await run_requests(
        [{"endpoint": "fal-ai/flux/schnell", "arguments": {"prompt": "a lighthouse at dusk"}}],
        run_key="lighthouses-2025-01-31",
    )

Re-running with the same run key resumes from the ledger: requests already recorded are not
submitted again and files already archived are not uploaded again (job ids are derived from the
run key, endpoint and arguments). Settings are read once, here, and passed down.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import anyio
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.events import RunCounts, emit_run_finished
from settings import Settings, load_settings
from tasks.cleanup import CleanupIncomplete, CleanupReport, cleanup_task
from tasks.errors import JobFailed
from tasks.jobs import JobsFailed, run_jobs_task
from tasks.models import Job
from tasks.report import publish_table
from tasks.runtime import Runtime, new_run_key, open_runtime, run_logger


class RequestSpec(BaseModel):
    """One request of the flow's ``requests`` parameter."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    arguments: dict[str, Any] = Field(default_factory=dict)


def plan_jobs(requests: Sequence[RequestSpec], run_key: str, settings: Settings) -> list[Job]:
    """One job per request; identical requests get distinct ids, in order, stable across re-runs."""
    seen: dict[str, int] = {}
    jobs = []
    for request in requests:
        canonical = json.dumps([request.endpoint, request.arguments], sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        count = seen[digest] = seen.get(digest, -1) + 1
        jobs.append(
            Job(
                job_id=Job.make_id(run_key, request.endpoint, f"{digest}-{count}"),
                endpoint=request.endpoint,
                arguments=request.arguments,
                policy=settings.retention.policy_for(request.endpoint),
            )
        )
    return jobs


async def run_batches(rt: Runtime, jobs: Sequence[Job]) -> tuple[list[JobFailed], list[Exception]]:
    """Every job, ``limits.jobs_per_task_run`` per Prefect task run, all batches concurrently.

    Returns the jobs that failed (their records say why) and any unexpected error of a batch;
    a batch's error does not cancel the others (their requests are paid for).
    """
    size = rt.settings.limits.jobs_per_task_run
    failures: list[JobFailed] = []
    errors: list[Exception] = []

    async def batch(chunk: list[Job]) -> None:
        try:
            await run_jobs_task(chunk)
        except JobsFailed as exc:
            failures.extend(exc.failures)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for start in range(0, len(jobs), size):
            tg.start_soon(batch, list(jobs[start : start + size]))
    return failures, errors


@flow(name="falflow-retention")
async def run_requests(requests: list[dict[str, Any]], run_key: str | None = None) -> CleanupReport:
    """Run ``requests`` (each ``{"endpoint", "arguments"}``) with the retention policy applied.

    Raises:
        CleanupIncomplete: some request is left on fal (failed, not verified, or its deletion
            failed); the message lists them and what to do.
        Exception: whatever stopped a batch unexpectedly (after cleanup of the others).
    """
    settings = load_settings()
    specs = [RequestSpec.model_validate(r) for r in requests]
    run_key = run_key or new_run_key()
    jobs = plan_jobs(specs, run_key, settings)
    log = run_logger()
    async with open_runtime(settings, run_key) as rt:
        log.info(
            "run %s: %d requests, archiving into %s", run_key, len(jobs), rt.bucket.location("")
        )
        failures, errors = await run_batches(rt, jobs)
        if failures:
            log.warning(
                "run %s: %d requests failed; cleaning up the others", run_key, len(failures)
            )
        report = await cleanup_task([job.job_id for job in jobs])
        await publish_table(run_key, report.records)
    problems = report.problems(allow_unverified=settings.retention.allow_unverified)
    emit_run_finished(  # before raising: automations alert on failed runs too
        run_key,
        RunCounts.of(report.records),
        flow="falflow-retention",
        status="failed" if problems or errors else "completed",
    )
    if errors:
        raise errors[0] if len(errors) == 1 else ExceptionGroup("batches failed", errors)
    if problems:
        raise CleanupIncomplete(report, problems)
    log.info("run %s: %d requests archived and deleted from fal", run_key, len(report.deleted))
    return report
