"""falflow's side of each benchmark, run in a child process (``bench.child``) against the emulator.

Settings come from the environment exactly as a user's deployment reads them (``FALFLOW_*``,
``FAL_KEY``, ``PREFECT_API_URL``), so what is measured is falflow as shipped.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from uuid import UUID

import anyio
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.client.schemas.sorting import TaskRunSort

from bench.baseline import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, prompt
from bench.harness import JSON, peak_rss_mib, stopwatch
from falflow.flows.dsl import Step, generate, ref
from falflow.flows.scope import retention_scope
from falflow.settings import load_settings
from falflow.tasks.archive import archive
from falflow.tasks.cleanup import cleanup
from falflow.tasks.ledger import Ledger
from falflow.tasks.models import JobRecord, JobState
from falflow.tasks.runtime import Runtime, open_runtime
from falflow.tasks.store import open_bucket

_PAGE = 200


@flow(name="falflow-bench-two-step")
async def two_step_flow(n: int) -> JSON:
    """``n`` chains of text-to-image then upscale of its first image, through the DAG API."""
    chains: list[tuple[Step, Step]] = []
    async with retention_scope() as scope:
        for index in range(n):
            image = generate(TEXT_TO_IMAGE, prompt(index), name="image")
            upscale = generate(
                IMAGE_TO_IMAGE, {"image_url": ref(image, "images[0].url")}, name="upscale"
            )
            chains.append((image, upscale))
    summary = scope.summary
    assert summary is not None  # set by the scope's cleanup
    return {
        "ok": summary.ok,
        "requests": summary.requests,
        "archived": summary.archived,
        "archived_bytes": summary.archived_bytes,
        "deleted": summary.deleted,
        "failed": len(summary.failed) + len(summary.skipped) + len(summary.unverified),
        "task_runs_made": scope.task_runs,
        **await _residue(scope.run_key, chains),
    }


async def _residue(run_key: str, chains: list[tuple[Step, Step]]) -> JSON:
    """How long each request stayed on fal once nothing needed it any more (its reader's archive,
    or its own when nobody reads it) until its deletion was confirmed, from the ledger; and the
    cleanup tail: the last confirmed deletion after the last archive."""
    ledger = Ledger(open_bucket(load_settings().bucket))
    records = {r.job_id: r async for r in ledger.list(run_key)}
    windows: list[float] = []
    for image, upscale in chains:
        read, reader = records.get(image.job_id or ""), records.get(upscale.job_id or "")
        for record, freed in ((read, reader), (reader, reader)):
            if record is None or freed is None or record.deleted_at is None:
                continue
            since = freed.archived_at or freed.finished_at
            if since is not None:
                windows.append((record.deleted_at - since).total_seconds())
    archived = [r.archived_at for r in records.values() if r.archived_at is not None]
    deleted = [r.deleted_at for r in records.values() if r.deleted_at is not None]
    windows.sort()
    return {
        "residue_seconds_median": round(statistics.median(windows), 2) if windows else None,
        "residue_seconds_p99": round(windows[int(0.99 * (len(windows) - 1))], 2)
        if windows
        else None,
        "residue_measured": len(windows),
        "cleanup_tail_seconds": round((max(deleted) - max(archived)).total_seconds(), 2)
        if archived and deleted
        else None,
    }


async def _task_runs(flow_run_id: UUID) -> list[TaskRun]:
    runs: list[TaskRun] = []
    async with get_client() as client:
        while True:
            page = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.ID_DESC,
                limit=_PAGE,
                offset=len(runs),
            )
            runs += page
            if len(page) < _PAGE:
                return runs


def _timeline(flow_start: datetime | None, runs: list[TaskRun]) -> JSON:
    """Per kind of task run (lane group, or cleanup): seconds from the flow run's start to the
    first start and to the last end, so the report can say where the wall time went."""
    if flow_start is None:
        return {}
    spans: dict[str, list[float]] = {}
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        kind = run.name.split(" #")[0] if " #" in run.name else run.name.split("-")[0]
        start = (run.start_time - flow_start).total_seconds()
        end = (run.end_time - flow_start).total_seconds()
        span = spans.setdefault(kind, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return {kind: [round(a, 1), round(b, 1)] for kind, (a, b) in sorted(spans.items())}


async def two_step(n: int, api_timeout: float) -> JSON:
    """Run the flow, then ask the Prefect API how many task runs it recorded (waiting for it to
    catch up, at most ``api_timeout`` seconds)."""
    with stopwatch() as watch:
        state = await two_step_flow(n, return_state=True)
    rss_after_flow = peak_rss_mib()
    result: JSON = await state.result()  # type: ignore[misc]
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    waited = time.perf_counter()
    while True:
        runs = await _task_runs(flow_run_id)
        caught_up = len(runs) >= result["task_runs_made"]
        if caught_up or time.perf_counter() - waited > api_timeout:
            break
        await anyio.sleep(1.0)
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
    return {
        **result,
        "timeline": _timeline(flow_run.start_time, runs),
        "flow_state": state.type.value,
        "wall_seconds": watch.wall,
        "cpu_seconds": watch.cpu,
        "peak_rss_after_flow_mib": round(rss_after_flow, 1),
        "task_runs_recorded": len(runs),
        "task_runs_completed": sum(r.state_type == StateType.COMPLETED for r in runs),
        "api_catch_up_seconds": round(time.perf_counter() - waited, 1),
    }


def _records(
    rt: Runtime, endpoint: str, state: JobState, request_ids: list[str]
) -> list[JobRecord]:
    """Ledger records of this run for requests already at ``state`` on fal."""
    policy = rt.settings.retention.policy_for(endpoint)
    return [
        JobRecord(
            job_id=f"job-{index}",
            run_key=rt.run_key,
            endpoint=endpoint,
            state=state,
            request_id=request_id,
            policy=policy,
        )
        for index, request_id in enumerate(request_ids)
    ]


async def archive_outputs(outputs: list[JSON], endpoint: str) -> JSON:
    """falflow's archive step on already completed requests (``{"request_id", "output"}`` each),
    all at once under ``limits.downloads``."""
    async with open_runtime(load_settings(), f"bench-archive-{time.time_ns()}") as rt:
        records = _records(
            rt, endpoint, JobState.COMPLETED, [item["request_id"] for item in outputs]
        )
        archived: list[JobRecord] = []

        async def one(record: JobRecord, output: JSON) -> None:
            archived.append(await archive(rt, record, output))

        with stopwatch() as watch:
            async with anyio.create_task_group() as tg:
                for record, item in zip(records, outputs, strict=True):
                    tg.start_soon(one, record, item["output"])
    not_verified = [r.error for r in archived if not r.verified]
    if not_verified:
        raise RuntimeError(f"{len(not_verified)} archives not verified, first: {not_verified[0]}")
    return {
        "bytes": sum(r.archived_bytes for r in archived),
        "files": sum(len(r.objects) for r in archived),
        "wall_seconds": watch.wall,
        "cpu_seconds": watch.cpu,
    }


async def delete_all(request_ids: list[str], endpoint: str) -> JSON:
    """falflow's cleanup of verified records for ``request_ids`` (paced by its settings)."""
    async with open_runtime(load_settings(), f"bench-cleanup-{time.time_ns()}") as rt:
        records = _records(rt, endpoint, JobState.ARCHIVED, request_ids)
        with stopwatch() as watch:
            report = await cleanup(rt, records)
    problems = [*report.delete_failed, *report.kept]
    return {
        "deletions": len(request_ids),
        "deleted": len(report.deleted),
        "failed": len(problems),
        "first_failure": problems[0].reason if problems else None,
        "wall_seconds": watch.wall,
        "cpu_seconds": watch.cpu,
    }
