"""Account-wide limits on the test harness: two flow runs at once sharing a Prefect global
concurrency limit of K never have more than K requests in flight on the emulator together
(measured from the emulator's request timeline); deletions go through a shared rate limit; a
limit that does not exist fails the requests instead of limiting nothing."""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from falflow.emulator import RunningEmulator
from falflow.flows.dsl import generate
from falflow.flows.scope import retention_scope
from falflow.flows.summary import RunSummary

pytestmark = pytest.mark.usefixtures("prefect_harness")

K = 2
REQUESTS_PER_RUN = 5


BOTH_OPEN = threading.Barrier(2)
"""Both runs' scopes are open before either submits: the two runs are in flight together."""


@flow(name="falflow-limited")
async def limited(tag: str, run: int, together: bool = True) -> RunSummary:
    async with retention_scope(run_key=f"limited-{tag}-{run}") as scope:
        if together:
            await anyio.to_thread.run_sync(BOTH_OPEN.wait, 60)
        for i in range(REQUESTS_PER_RUN):
            generate("emulator/echo", {"output": {"tag": tag, "run": run, "i": i}})
    assert scope.summary is not None
    return scope.summary


async def _create_limits(name: str, rate_name: str) -> None:
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=K)
        )
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=rate_name, limit=5, slot_decay_per_second=20.0)
        )


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_two_runs_sharing_a_global_limit_never_exceed_it_together(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    name, rate_name = f"fal-account-{tag}", f"fal-deletes-{tag}"
    asyncio.run(_create_limits(name, rate_name))
    for key, value in emulator.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FALFLOW_BUCKET__URL", (tmp_path / "archive").as_uri())
    monkeypatch.setenv("FALFLOW_LIMITS__POLL_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("FALFLOW_LIMITS__ACCOUNT_CONCURRENCY_LIMIT", name)
    monkeypatch.setenv("FALFLOW_LIMITS__DELETE_RATE_LIMIT", rate_name)
    emulator.configure(model_latency={"emulator/echo": 0.4})
    try:
        # two flow runs at once, as two workers' runs would be (each with its own event loop)
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(asyncio.run, limited(tag, run)) for run in (1, 2)]
            summaries = [run.result(timeout=120) for run in runs]
    finally:
        emulator.configure(model_latency={})
    assert [s.deleted for s in summaries] == [REQUESTS_PER_RUN, REQUESTS_PER_RUN]

    ours = [
        r
        for r in emulator.requests()
        if r["endpoint_id"] == "emulator/echo"
        and r["arguments"].get("output", {}).get("tag") == tag
    ]
    assert len(ours) == 2 * REQUESTS_PER_RUN
    intervals = [
        (datetime.fromisoformat(r["submitted_at"]), datetime.fromisoformat(r["ended_at"]))
        for r in ours
    ]
    # each run alone would have all its requests in flight at once: the limit was shared,
    # reached, and never exceeded
    assert _max_overlap(intervals) == K


def test_a_limit_that_does_not_exist_fails_the_requests(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in emulator.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FALFLOW_BUCKET__URL", (tmp_path / "archive").as_uri())
    monkeypatch.setenv("FALFLOW_LIMITS__ACCOUNT_CONCURRENCY_LIMIT", "no-such-limit")
    called = limited("missing", 1, together=False, return_state=True)
    state = asyncio.run(called)  # type: ignore[arg-type]
    assert state.is_failed()
    summary = asyncio.run(state.aresult(raise_on_failure=False))
    assert "no-such-limit" in str(summary)
