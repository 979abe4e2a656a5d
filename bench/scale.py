"""Sharded runs on Prefect's production stack: the same batch sharded over 1, 2 and 4 process
workers, against one unsharded flow run of it, in the same bench run.

The stack: PostgreSQL and Redis on loopback (``bench.databases``), a ``prefect server`` on them
with Redis messaging, its API in two processes (``--workers 2``) and its services in a third,
a process work pool, the emulator in its own process, a ``file://`` bucket. The batch is N
two-step requests (text-to-image, then an upscale of each image, item by item) through
``run_pipeline``; every run is a flow run of one deployment taken by the pool's workers.

Per configuration: wall time from the parent's creation to its end; peak RSS of one flow-run
process (a shard, or the unsharded run) and of each worker machine (the worker with every flow
run it holds at once); task runs recorded in the API against those the flows made (every task
run that logged a line, named by its logs); CPU of the server side (API, services, PostgreSQL,
Redis); what is left on the emulator.

    python -m bench --only scale [--quick | --full]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.databases import Databases, databases
from bench.harness import JSON, REPO, BenchError, Row, free_port, ratio, row
from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process

BIN = Path(sys.executable).parent
POOL = "falflow-scale"
DEPLOYMENT = "falflow-pipeline/scale"
LATENCY_SECONDS = 1.0
"""Model run time on the emulator, as in the overhead benchmark."""
SHARDS = 4
CONCURRENCY = 64
"""Requests in flight in all (as in the overhead benchmark), split evenly over the shards."""
WORKERS = (1, 2, 4)
WORKER_LIMIT = 1 + SHARDS
"""Flow runs one worker runs at once: the parent and every shard fit on one worker."""
WALL_TARGET = 1.10
RSS_TARGET_MIB = 250.0
SPEC = {
    "name": "scale",
    "params": {"prompts": {"type": "list"}},
    "steps": [
        {
            "name": "image",
            "endpoint": "fal-ai/flux/schnell",
            "for_each": "{{ params.prompts }}",
            "arguments": {"prompt": "{{ item }}", "image_size": "square"},
        },
        {
            "name": "upscale",
            "endpoint": "fal-ai/esrgan",
            "for_each": "{{ steps.image }}",
            "arguments": {"image_url": "{{ item.images[0].url }}"},
        },
    ],
}
"""Two requests per prompt: N requests are N / 2 prompts."""


def _tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _status_kib(pid: int, field_name: str) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class _Sampler:
    """Samples, every 0.25 s, each worker's resident memory with its flow-run processes, and
    each flow-run process's own peak (VmHWM, read while it lives)."""

    workers: dict[str, int]
    machine_peak_kib: dict[str, int] = field(default_factory=dict)
    process_peak_kib: dict[int, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.25):
            for name, pid in self.workers.items():
                tree = _tree(pid)
                total = sum(_status_kib(p, "VmRSS") for p in tree)
                self.machine_peak_kib[name] = max(self.machine_peak_kib.get(name, 0), total)
                for child in tree[1:]:
                    peak = _status_kib(child, "VmHWM")
                    self.process_peak_kib[child] = max(self.process_peak_kib.get(child, 0), peak)


@dataclass
class _Stack:
    api_url: str
    env: dict[str, str]
    home: Path
    server_pids: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(6):
            answer = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=60)
            if answer.status_code not in (429, 502, 503) or attempt == 5:
                break
            time.sleep(0.5 * 2**attempt)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.home / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc.pid

    def server_cpu(self) -> float:
        return _cpu_seconds([p for pid in self.server_pids for p in _tree(pid)])

    def stop(self, pid: int) -> None:
        for proc in self.procs:
            if proc.pid == pid and proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(pid, signal.SIGKILL)
                    proc.wait()


@contextmanager
def _production_stack(db: Databases, emulator_env: dict[str, str]) -> Iterator[_Stack]:
    home = Path(tempfile.mkdtemp(prefix="falflow-bench-scale-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FALFLOW_"))}
    env |= db.prefect_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        **emulator_env,
    }
    prefect = str(BIN / "prefect")
    stack = _Stack(env["PREFECT_API_URL"], env, home, [db.postgres_pid, db.redis_pid])
    try:
        subprocess.run(
            [prefect, "server", "database", "upgrade", "--yes"],
            env=env, check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        argv = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        stack.server_pids.append(stack.start("server", [*argv, "--workers", "2"]))
        stack.server_pids.append(stack.start("services", [prefect, "server", "services", "start"]))
        deadline = time.monotonic() + 180
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("the Prefect server on PostgreSQL did not start in 180 s")
            time.sleep(0.5)
        subprocess.run(
            [prefect, "work-pool", "create", POOL, "--type", "process"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        deploy = (
            "from prefect.types.entrypoint import EntrypointType\n"
            "from falflow.flows.pipeline import run_pipeline\n"
            f"run_pipeline.deploy(name='scale', work_pool_name={POOL!r},\n"
            "    entrypoint_type=EntrypointType.MODULE_PATH, build=False, push=False)\n"
        )
        subprocess.run(
            [sys.executable, "-c", deploy], cwd=REPO, env=env, check=True, capture_output=True,
            timeout=300,
        )  # fmt: skip
        yield stack
    finally:
        for proc in reversed(stack.procs):
            stack.stop(proc.pid)
        shutil.rmtree(home, ignore_errors=True)


def _run(
    stack: _Stack, emu: RunningEmulator, workers: int, n: int, shards: int | None, bucket: Path
) -> JSON:
    """One batch of ``n`` requests on ``workers`` fresh workers (``shards`` None: unsharded)."""
    emu.reset()
    prompts = [f"prompt {i}: a lighthouse at dusk" for i in range(n // 2)]
    run_key = f"scale-{n}-{workers}w-{shards or 0}s-{time.time_ns()}"
    worker_env = {
        "FALFLOW_BUCKET__URL": bucket.as_uri(),
        # the same requests in flight in all: the shards share what the unsharded run has
        "FALFLOW_LIMITS__MAX_IN_FLIGHT": str(CONCURRENCY // (shards or 1)),
        "FALFLOW_LIMITS__DELETE_RATE_PER_SECOND": "1000",  # the emulator is not rate-limited
    }
    pids = {
        f"worker-{i}": stack.start(
            f"worker-{run_key}-{i}",
            [
                str(BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                POOL,
                "--name",
                f"w{i}-{run_key}",
                "--type",
                "process",
                "--limit",
                str(WORKER_LIMIT),
            ],
            worker_env,
        )
        for i in range(workers)
    }
    sampler = _Sampler(pids)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        deployment = stack.api("GET", f"/deployments/name/{DEPLOYMENT}")
        cpu_before, started = stack.server_cpu(), time.perf_counter()
        parameters: JSON = {"spec": SPEC, "parameters": {"prompts": prompts}, "run_key": run_key}
        if shards is not None:
            parameters["shard_size"] = -(-len(prompts) // shards)
        created = stack.api(
            "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
        )
        timeout = 600 + n * 0.5
        while True:
            [parent] = stack.api(
                "POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": [created["id"]]}}}
            )
            if parent["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            if time.perf_counter() - started > timeout:
                raise BenchError(f"{run_key} did not finish in {timeout:.0f} s")
            time.sleep(0.5)
        wall = time.perf_counter() - started
        server_cpu = stack.server_cpu() - cpu_before
    finally:
        sampler.stop.set()
        thread.join()
        for pid in pids.values():
            stack.stop(pid)
    runs = [parent]
    if shards is not None:
        body = {"flow_runs": {"parent_flow_run_id": {"any_": [parent["id"]]}}, "limit": 200}
        runs = stack.api("POST", "/flow_runs/filter", body) or []
        runs = [r for r in runs if r["id"] != parent["id"]] + [parent]
    made, recorded = _task_runs(stack, [r["id"] for r in runs])
    inventory = emu.inventory(hashes=False)
    left = len(inventory["payloads"]) + sum(f.get("kind") == "output" for f in inventory["files"])
    shutil.rmtree(bucket, ignore_errors=True)
    return {
        "n": n,
        "workers": workers,
        "shards": shards,
        "state": parent["state_type"],
        "wall_seconds": round(wall, 1),
        "server_cpu_seconds": round(server_cpu, 1),
        "task_runs_made": made,
        "task_runs_recorded": recorded,
        "left_on_fal": left,
        "flow_run_peak_rss_mib": round(max(sampler.process_peak_kib.values(), default=0) / 1024, 1),
        "worker_machine_peak_rss_mib": {
            name: round(kib / 1024, 1) for name, kib in sampler.machine_peak_kib.items()
        },
    }


def _task_runs(stack: _Stack, flow_run_ids: list[str]) -> tuple[int, int]:
    """Task runs the flows made (those that logged a line) and how many of those the API
    recorded, waiting up to 60 s for the API to catch up."""
    made: set[str] = set()
    for flow_run_id in flow_run_ids:
        offset = 0
        while True:
            body = {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "limit": 200,
                "offset": offset,
            }
            page = stack.api("POST", "/logs/filter", body)
            made |= {log["task_run_id"] for log in page if log["task_run_id"]}
            offset += len(page)
            if len(page) < 200:
                break
    deadline = time.monotonic() + 60
    while True:
        recorded: set[str] = set()
        ids = sorted(made)
        for start in range(0, len(ids), 200):
            body = {"task_runs": {"id": {"any_": ids[start : start + 200]}}, "limit": 200}
            recorded |= {t["id"] for t in stack.api("POST", "/task_runs/filter", body)}
        if recorded == made or time.monotonic() > deadline:
            return len(made), len(recorded)
        time.sleep(2)


def run(quick: bool = False, full: bool = False) -> JSON:
    """N = 200 (quick: nothing judged), 2,000, or 20,000 with ``full``."""
    n = 200 if quick else 20_000 if full else 2_000
    worker_counts = (2,) if quick else WORKERS
    details: dict[str, Any] = {"n": n, "shards": SHARDS, "latency_seconds": LATENCY_SECONDS}
    rows: list[Row] = []
    errors: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="falflow-bench-scale-bucket-") as tmp,
        databases() as db,
        start_emulator_process(EmulatorConfig(latency_seconds=LATENCY_SECONDS)) as emu,
        _production_stack(db, emu.client_env()) as stack,
    ):
        bucket = Path(tmp) / "bucket"
        try:
            unsharded = _run(stack, emu, 1, n, None, bucket)
            details["unsharded"] = unsharded
            rows += _rows(f"scale N={n:,} unsharded, 1 worker", unsharded, None, judged=not quick)
            for workers in worker_counts:
                sharded = _run(stack, emu, workers, n, SHARDS, bucket)
                details[f"sharded_{workers}_workers"] = sharded
                label = f"scale N={n:,} in {SHARDS} shards, {workers} worker(s)"
                rows += _rows(label, sharded, unsharded, judged=not quick)
        except (BenchError, httpx.HTTPError, subprocess.CalledProcessError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"rows": rows, "errors": errors, "details": details}


def _rows(label: str, found: JSON, unsharded: JSON | None, *, judged: bool) -> list[Row]:
    def met(ok: bool) -> bool | None:
        return ok if judged else None

    wall = None if unsharded is None else ratio(found["wall_seconds"], unsharded["wall_seconds"])
    machines = found["worker_machine_peak_rss_mib"]
    return [
        row(
            f"{label}: wall ({found['state'].lower()})",
            unit="s",
            falflow=found["wall_seconds"],
            baseline=None if unsharded is None else unsharded["wall_seconds"],
            ratio=wall,
            target="" if unsharded is None else f"≤ {WALL_TARGET:.2f}× unsharded",
            met=None if wall is None else met(wall <= WALL_TARGET),
        ),
        row(
            f"{label}: peak RSS of one flow run (worker machines {max(machines.values(), default=0):.0f} MiB)",
            unit="MiB",
            falflow=found["flow_run_peak_rss_mib"],
            target=f"≤ {RSS_TARGET_MIB:.0f} MiB",
            peak_rss_mib=found["flow_run_peak_rss_mib"],
            met=met(found["flow_run_peak_rss_mib"] <= RSS_TARGET_MIB),
        ),
        row(
            f"{label}: task runs recorded / made",
            unit="",
            falflow=found["task_runs_recorded"],
            baseline=found["task_runs_made"],
            target="0 lost",
            met=found["task_runs_recorded"] == found["task_runs_made"],
        ),
        row(
            f"{label}: server CPU (API, services, PostgreSQL, Redis)",
            unit="s",
            falflow=found["server_cpu_seconds"],
        ),
        row(
            f"{label}: left on fal",
            unit="",
            falflow=found["left_on_fal"],
            target="0",
            met=found["left_on_fal"] == 0 and found["state"] == "COMPLETED",
        ),
    ]
