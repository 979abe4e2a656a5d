"""A real Prefect stack on loopback for the end-to-end tests: server, workers, deploys.

Every process is started in its own session and tracked; ``Stack.close`` stops them all (and any
flow-run process a worker started, which Prefect puts in a session of its own), even when the
test failed half-way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found[::-1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    """One Prefect server (SQLite in a temp PREFECT_HOME) and what runs against it."""

    home: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    extra_pids: set[int] = field(default_factory=set)

    @property
    def api_url(self) -> str:
        return self.env["PREFECT_API_URL"]

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        log = self.home / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: list[str], timeout: float = 120, env: Mapping[str, str] | None = None
    ) -> str:
        """Run a command to completion against this stack; its output, or an error with it."""
        done = subprocess.run(
            argv,
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One call to the server's REST API, retried like Prefect's own client retries (a busy
        SQLite database answers 503)."""
        for attempt in range(6):
            response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
            if response.status_code not in (429, 502, 503) or attempt == 5:
                break
            time.sleep(0.5 * 2**attempt)
        response.raise_for_status()
        return response.json() if response.content else None

    def start_worker(self, pool: str, name: str, env: Mapping[str, str], *, limit: int = 1) -> Proc:
        # --limit 1 (default): a busy worker leaves the next run to another worker of the pool.
        argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name]
        return self.start(name, [*argv, "--type", "process", "--limit", str(limit)], env)

    def flow_runs(self, **flow_run_filter: Any) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.api(
            "POST", "/flow_runs/filter", {"flow_runs": flow_run_filter, "limit": 200}
        )
        for run in runs:
            if run.get("infrastructure_pid"):
                pid = str(run["infrastructure_pid"]).rsplit(":", 1)[-1]
                if pid.isdigit():
                    self.extra_pids.add(int(pid))
        return runs

    def wait_for_runs(
        self, deployment_id: str, count: int, timeout: float, *, terminal: bool = True
    ) -> list[dict[str, Any]]:
        """Wait until the deployment has ``count`` runs (in a final state, with ``terminal``)."""

        def ready() -> list[dict[str, Any]] | None:
            runs = self.flow_runs(deployment_id={"any_": [deployment_id]})
            done = [r for r in runs if not terminal or r["state_type"] in TERMINAL]
            return runs if len(done) >= count else None

        try:
            runs: list[dict[str, Any]] = wait_for(
                f"{count} run(s) of deployment {deployment_id}", ready, timeout, 0.5
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        return runs

    def deployment_id(self, flow_and_deployment: str) -> str:
        flow, name = flow_and_deployment.split("/")
        found: dict[str, Any] = self.api("GET", f"/deployments/name/{flow}/{name}")
        return str(found["id"])

    def run_deployment(self, deployment_id: str, parameters: dict[str, Any]) -> str:
        created = self.api(
            "POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters}
        )
        return str(created["id"])

    def events(self, name: str, resource_id: str) -> list[dict[str, Any]]:
        """Events the server has stored named ``name`` about ``resource_id``."""
        body = {"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}}
        found: list[dict[str, Any]] = self.api("POST", "/events/filter", body)["events"]
        return found

    def diagnostics(self) -> str:
        parts = [f"--- {p.name} (rc={p.popen.poll()}):\n{p.tail()}" for p in self.procs]
        return "\n".join(parts)

    def close(self) -> None:
        pids = set(self.extra_pids)
        for proc in self.procs:
            pids.update(descendants(proc.popen.pid))
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.popen, signal.SIGKILL)
                proc.popen.wait(timeout=5)
        for pid in pids:
            _kill(pid, signal.SIGKILL)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if popen.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)


def _kill(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextmanager
def prefect_stack(
    home: Path,
    *,
    start_timeout: float = 90,
    ui: bool = False,
    server_env: Mapping[str, str] | None = None,
    api_workers: int = 1,
) -> Iterator[Stack]:
    """A Prefect server on a free loopback port with its own PREFECT_HOME and SQLite database
    (and its UI, with ``ui``: ``docs/screenshots.py`` looks at the run page).

    ``server_env`` configures it further, e.g. PostgreSQL and Redis messaging
    (``bench.databases.Databases.prefect_env``); every process of the stack gets it. With
    ``api_workers`` > 1 the API runs in that many processes (it then starts no services: Prefect
    runs them, the task run recorder among them, in a ``prefect server services start`` process).
    """
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FALFLOW_", "FAL_"))
    }
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": str(ui).lower(),
        "PREFECT_UI_ENABLED": str(ui).lower(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PYTHONUNBUFFERED": "1",
        **(server_env or {}),
    }
    stack = Stack(home=home, env=env)
    try:
        prefect = str(BIN / "prefect")
        if api_workers > 1:  # the API processes would each migrate the database at once
            stack.run([prefect, "server", "database", "upgrade", "--yes"], timeout=300)
            stack.env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
        argv = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        server = stack.start("server", [*argv, "--workers", str(api_workers)])
        if api_workers > 1:
            stack.start("services", [prefect, "server", "services", "start"])

        def healthy() -> bool:
            if server.popen.poll() is not None:
                raise AssertionError(f"prefect server exited:\n{server.tail()}")
            try:
                return httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server", healthy, start_timeout)
        yield stack
    finally:
        stack.close()
