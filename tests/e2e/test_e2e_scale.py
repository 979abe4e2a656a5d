"""End to end on Prefect's production stack: a ``prefect server`` on PostgreSQL with Redis
messaging, its API in two processes (``--workers 2``) and its services in a third, three process
workers on one pool, the emulator in its own process, a local directory as the bucket.

- a sharded pipeline (600 requests in 6 shards: 200 prompts through the sample's three steps)
  runs as one child flow run per shard on the pool; at least two workers take shards; every task
  run the shards made is in the API; the emulator holds nothing afterwards; every archived
  object's sha256 matches;
- a worker lost with its machine mid-shard (SIGKILL): the parent marks that shard's run Crashed
  once its lease expires and starts it again; it resumes from its ledger, and the emulator's
  request log shows every input once;
- a worker lost alone (its flow runs live on, logging into a broken pipe): they finish by
  themselves, nothing is started again and every input is submitted once.

The issue's 6,000 requests in 6 shards take minutes on the 2-core machine: ``python -m bench
--only scale`` measures those sizes (see bench/README.md); this test keeps the suite's budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.databases import databases, missing_packages
from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process
from tests.support.stack import (
    BIN,
    TERMINAL,
    Proc,
    Stack,
    descendants,
    prefect_stack,
    wait_for,
)

pytestmark = pytest.mark.slow

POOL = "falflow"
PROMPTS = [f"prompt {i}: a lighthouse at dusk" for i in range(200)]
SHARD_SIZE = 34  # 200 prompts → 6 shards, 3 requests (image, upscale, video) per prompt
LEASE_SECONDS = 10
"""The shards' lease: a shard lost with its worker is started again this soon after."""


@dataclass
class Scale:
    stack: Stack
    emulator: RunningEmulator
    bucket: Path
    deployment_id: str

    def run(self, run_key: str, prompts: list[str], shard_size: int) -> str:
        parameters = {
            "spec": "sample",
            "parameters": {"prompts": prompts},
            "run_key": run_key,
            "shard_size": shard_size,
        }
        return self.stack.run_deployment(self.deployment_id, parameters)

    def finished(self, flow_run_id: str, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            [run] = self.stack.flow_runs(id={"any_": [flow_run_id]})
            return run if run["state_type"] in TERMINAL else None

        try:
            run: dict[str, Any] = wait_for(f"flow run {flow_run_id}", done, timeout, 1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.stack.diagnostics()}") from None
        return run

    def shard_runs(self, run_key: str) -> list[dict[str, Any]]:
        """Every flow run of the deployment for a shard of ``run_key`` (retries included)."""
        runs = self.stack.flow_runs(deployment_id={"any_": [self.deployment_id]})
        mark = f"{run_key}.shard-"
        return [r for r in runs if str(r["parameters"].get("run_key", "")).startswith(mark)]

    def records(self, run_key: str) -> list[dict[str, Any]]:
        folder = self.bucket / "ledger" / run_key
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def assert_archived_and_deleted(self, run_keys: list[str], count: int) -> None:
        records = [r for key in run_keys for r in self.records(key)]
        assert len(records) == count
        for record in records:
            assert record["state"] == "deleted", record
            for obj in record["objects"]:
                data = (self.bucket / obj["key"]).read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (obj["size"], obj["sha256"])
        inventory = self.emulator.inventory(hashes=False)
        assert inventory["payloads"] == {}
        assert [f for f in inventory["files"] if f.get("kind") == "output"] == []

    def takers(self, flow_run_ids: list[str]) -> set[str]:
        """The workers whose logs say they ran any of these flow runs."""
        logs = {p.name: p.log.read_text() for p in self.stack.procs if p.name.startswith("worker")}
        return {name for name, text in logs.items() for i in flow_run_ids if f"'{i}'" in text}


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scale]:
    missing = missing_packages()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them); CI fails here")
    home = tmp_path_factory.mktemp("prefect-home")
    bucket = tmp_path_factory.mktemp("bucket")
    config = EmulatorConfig(
        latency_seconds=0.2, video_size_bytes=16 * 1024, stream_keepalive_seconds=0.5
    )
    with (
        databases() as db,
        start_emulator_process(config) as emulator,
        prefect_stack(home, server_env=db.prefect_env(), api_workers=2) as stack,
    ):
        prefect = str(BIN / "prefect")
        stack.run([prefect, "work-pool", "create", POOL, "--type", "process"])
        worker_env = {
            **emulator.client_env(),
            "FALFLOW_BUCKET__URL": bucket.as_uri(),
            "FALFLOW_LIMITS__LEASE_SECONDS": str(LEASE_SECONDS),
            "FALFLOW_RETENTION__START_TIMEOUT_SECONDS": "5",  # a lost shard restarts 17 s later
        }
        for name in ("worker-1", "worker-2", "worker-3"):
            stack.start_worker(POOL, name, worker_env, limit=2)
        stack.run([prefect, "--no-prompt", "deploy", "--all"], timeout=180)
        for name in ("falflow-pipeline/nightly", "falflow-janitor/hourly"):
            deployment = stack.api("GET", f"/deployments/name/{name}")
            stack.api("PATCH", f"/deployments/{deployment['id']}", {"paused": True})
        deployment_id = stack.deployment_id("falflow-pipeline/on-event")
        yield Scale(stack, emulator, bucket, deployment_id)


def test_a_sharded_run_spreads_over_the_pool_and_loses_nothing(scale: Scale) -> None:
    started = time.monotonic()
    parent = scale.finished(scale.run("scale", PROMPTS, SHARD_SIZE), timeout=900)
    wall = time.monotonic() - started
    assert parent["state_type"] == "COMPLETED", (parent["state"], scale.stack.diagnostics())
    shards = scale.shard_runs("scale")
    assert sorted(r["parameters"]["run_key"] for r in shards) == [
        f"scale.shard-{i}" for i in range(6)
    ]
    assert {r["state_type"] for r in shards} == {"COMPLETED"}
    assert all(r["parent_task_run_id"] for r in shards)  # linked to the parent's run page
    takers = scale.takers([r["id"] for r in shards])
    assert len(takers) >= 2, takers
    scale.assert_archived_and_deleted([r["parameters"]["run_key"] for r in shards], 3 * 200)

    # Every task run a shard made is in the API: each lane and the cleanup log through the API
    # (logs do not travel as events), naming their task run; each of those is recorded, and
    # the lanes' own counts add up to every request.
    for shard in shards:
        logs = scale.stack.api(
            "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [shard["id"]]}}}
        )
        made = {log["task_run_id"] for log in logs if log["task_run_id"]}
        body = {"flow_runs": {"id": {"any_": [shard["id"]]}}, "limit": 200}
        recorded = scale.stack.api("POST", "/task_runs/filter", body)
        assert made <= {t["id"] for t in recorded}
        assert {t["state_type"] for t in recorded} == {"COMPLETED"}
        lanes = [t for t in recorded if not t["name"].startswith("cleanup")]
        requests = len(shard["parameters"]["parameters"]["prompts"]) * 3
        lane_lines = [log["message"] for log in logs if " requests: " in log["message"]]
        assert sum(int(m.split(": ")[1].split()[0]) for m in lane_lines) == requests
        assert len(lane_lines) == len(lanes)
    # the parent's report gathers the shards
    artifacts = scale.stack.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [parent["id"]]}}}
    )
    [table] = [a for a in artifacts if (a["key"] or "").endswith("-shards")]
    rows = table["data"] if isinstance(table["data"], list) else json.loads(table["data"])
    assert [(row["shard"], row["state"], row["archived"]) for row in rows] == [
        (i, "completed", 3 * min(SHARD_SIZE, 200 - i * SHARD_SIZE)) for i in range(6)
    ]
    print(f"600 requests in 6 shards on 3 workers: {wall:.0f} s; shards taken by {takers}")


def test_a_shard_lost_with_its_worker_is_started_again_and_submits_nothing_twice(
    scale: Scale,
) -> None:
    run_key = "scale-lost"
    prompts = [f"prompt {i}: a paper boat" for i in range(60)]
    before = len(scale.emulator.requests())
    scale.emulator.configure(latency_seconds=1.5)  # shards long enough to lose one mid-way
    try:
        parent_id = scale.run(run_key, prompts, 20)

        def a_shard_half_done() -> tuple[dict[str, Any], Proc] | None:
            [parent] = scale.stack.flow_runs(id={"any_": [parent_id]})
            for run in scale.shard_runs(run_key):
                key = run["parameters"]["run_key"]
                done = [r for r in scale.records(key) if r["state"] in ("archived", "deleted")]
                worker = _worker_of(scale, run) if run["state_type"] == "RUNNING" and done else None
                # the parent's own machine is not the one lost: that would lose the parent too
                # (then a re-run with its run key resumes every shard)
                if worker is not None and worker is not _worker_of(scale, parent):
                    return run, worker
            return None

        victim, worker = wait_for("a shard with archived requests", a_shard_half_done, 300, 0.25)
        flow_pid = int(str(victim["infrastructure_pid"]).rsplit(":", 1)[-1])
        _lose(scale, worker)  # the worker, and its machine with it
        os.kill(flow_pid, signal.SIGKILL)
    finally:
        scale.emulator.configure(latency_seconds=0.2)

    parent = scale.finished(parent_id, timeout=600)
    assert parent["state_type"] == "COMPLETED", _why(scale, run_key, parent)
    [lost] = scale.stack.flow_runs(id={"any_": [victim["id"]]})
    assert lost["state_type"] == "CRASHED"
    assert "lease expired" in lost["state"]["message"]
    key = victim["parameters"]["run_key"]
    again = [r for r in scale.shard_runs(run_key) if r["parameters"]["run_key"] == key]
    assert sorted(r["state_type"] for r in again) == ["COMPLETED", "CRASHED"]
    shard_keys = sorted({r["parameters"]["run_key"] for r in scale.shard_runs(run_key)})
    assert shard_keys == [f"{run_key}.shard-{i}" for i in range(3)]
    scale.assert_archived_and_deleted(shard_keys, 3 * 60)

    # nothing was submitted twice: each input appears once in the emulator's request log
    submitted = Counter(
        (r["endpoint_id"], json.dumps(r["arguments"], sort_keys=True))
        for r in scale.emulator.requests()[before:]
    )
    assert [what for what, n in submitted.items() if n > 1] == []
    assert sum(submitted.values()) == 3 * 60


def test_a_worker_lost_alone_leaves_its_runs_running_to_the_end(scale: Scale) -> None:
    """A worker dies (restarted, redeployed, OOM-killed) but not its machine: the flow runs it
    started live on, though the pipe they log to is gone, and finish by themselves."""
    run_key = "scale-orphans"
    prompts = [f"prompt {i}: a kite" for i in range(40)]
    before = len(scale.emulator.requests())
    scale.emulator.configure(latency_seconds=1.0)
    try:
        parent_id = scale.run(run_key, prompts, 20)

        def a_worker_with_a_running_shard() -> Proc | None:
            running = [r for r in scale.shard_runs(run_key) if r["state_type"] == "RUNNING"]
            for run in running:
                worker = _worker_of(scale, run)
                if worker is not None and scale.records(run["parameters"]["run_key"]):
                    return worker
            return None

        worker = wait_for("a running shard", a_worker_with_a_running_shard, 300, 0.25)
        running = scale.stack.flow_runs(state={"type": {"any_": ["RUNNING"]}})
        orphans = [r["id"] for r in running if _worker_of(scale, r) is worker]
        _lose(scale, worker)  # the worker alone: its runs' pipes break
    finally:
        scale.emulator.configure(latency_seconds=0.2)

    parent = scale.finished(parent_id, timeout=600)
    assert parent["state_type"] == "COMPLETED", _why(scale, run_key, parent)
    shards = scale.shard_runs(run_key)
    assert sorted(r["parameters"]["run_key"] for r in shards) == [
        f"{run_key}.shard-{i}" for i in range(2)
    ]  # none was started again
    assert {r["state_type"] for r in shards} == {"COMPLETED"}
    assert orphans
    assert {r["state_type"] for r in scale.stack.flow_runs(id={"any_": orphans})} == {"COMPLETED"}
    scale.assert_archived_and_deleted([r["parameters"]["run_key"] for r in shards], 3 * 40)
    assert len(scale.emulator.requests()) - before == 3 * 40


def _lose(scale: Scale, worker: Proc) -> None:
    """SIGKILL ``worker``'s process group (a flow run it started is in a session of its own)."""
    os.killpg(worker.popen.pid, signal.SIGKILL)
    worker.popen.wait(timeout=10)
    scale.stack.procs.remove(worker)


def _worker_of(scale: Scale, run: dict[str, Any]) -> Proc | None:
    """The worker process that started ``run`` (None once its process is gone)."""
    pid = int(str(run["infrastructure_pid"] or "0").rsplit(":", 1)[-1])
    for proc in scale.stack.procs:
        if proc.name.startswith("worker") and pid in descendants(proc.popen.pid):
            return proc
    return None


def _why(scale: Scale, run_key: str, parent: dict[str, Any]) -> str:
    """What a failed sharded run says of itself: its message, each shard run's state and
    message, each shard's ledger states (then the stack's logs)."""
    lines = [f"parent: {parent['state_type']}: {parent['state'].get('message')}"]
    for run in scale.shard_runs(run_key):
        key = run["parameters"]["run_key"]
        states = Counter(r["state"] for r in scale.records(key))
        message = (run.get("state") or {}).get("message")
        lines.append(f"{run['name']}: {run['state_type']}: {message}; ledger {dict(states)}")
    return "\n".join([*lines, str(scale.stack.diagnostics())])
