"""A retention scope in a Prefect flow on the test harness, against the emulator and a local
directory: archive, delete, report, fail the flow on what is left on fal, resume, never leak."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import State
from prefect.client.schemas.sorting import LogSort
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL
from sqlalchemy.engine import make_url

from falflow.emulator import RunningEmulator
from falflow.flows.dsl import generate
from falflow.flows.scope import retention_scope
from falflow.flows.summary import RunFailed, RunSummary
from falflow.tasks.models import JobRecord
from falflow.tasks.report import artifact_key

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def flow_env(archive: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment a deployed flow would get: the emulator, a local bucket, fast polling."""
    monkeypatch.setenv("FALFLOW_LIMITS__POLL_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("FALFLOW_LIMITS__MAX_POLL_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("FALFLOW_LIMITS__JOBS_PER_TASK_RUN", "2")
    return archive


@flow(name="falflow-requests")
async def run_requests(requests: list[dict[str, Any]], run_key: str) -> RunSummary:
    """Independent requests in one scope; fails when anything is left on fal."""
    async with retention_scope(run_key=run_key) as scope:
        for request in requests:
            generate(request["endpoint"], request["arguments"])
    assert scope.summary is not None
    if not scope.summary.ok:
        raise RunFailed(scope.summary)
    return scope.summary


def _records(archive: Path, run_key: str) -> list[JobRecord]:
    folder = archive / "ledger" / run_key
    return [JobRecord.model_validate_json(p.read_bytes()) for p in folder.glob("*.json")]


def _run(requests: list[dict[str, Any]], run_key: str) -> State[Any]:
    state: State[Any] = asyncio.run(run_requests(requests, run_key=run_key, return_state=True))  # type: ignore[arg-type]
    assert isinstance(state, State)
    return state


async def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    """The flow run's artifacts by key (keys are the flow's: one history across its runs)."""
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {str(a.key): a.data for a in found}


async def _logged(flow_run_id: UUID, text: str) -> bool:
    """Whether a log line of the flow run holding ``text`` has reached the API's database."""
    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            sort=LogSort.TIMESTAMP_DESC,
        )
    return any(text in log.message for log in logs)


def _harness_database() -> list[Path]:
    """The harness server's SQLite database file and its -wal/-shm/-journal companions."""
    url = make_url(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.get_backend_name() == "sqlite", url
    assert url.database, url
    path = Path(url.database)
    files = sorted(path.parent.glob(path.name + "*"))
    assert path in files, files
    return files


def _holding(paths: list[Path], needle: str) -> list[Path]:
    return [path for path in paths if path.exists() and needle.encode() in path.read_bytes()]


def _echo_count(emulator: RunningEmulator) -> int:
    return sum(r["endpoint_id"] == "emulator/echo" for r in emulator.requests())


def _everything_in(archive: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in archive.rglob("*.json"))


def test_flow_archives_deletes_reports_and_never_leaks_the_key(
    emulator: RunningEmulator, flow_env: Path, all_logs: list[str]
) -> None:
    run_key = "flow-ok"
    requests = [
        {"endpoint": "fal-ai/flux/schnell", "arguments": {"prompt": "a red kite"}},
        {"endpoint": "emulator/echo", "arguments": {"output": {}, "files": [{"size": 4096}]}},
        {"endpoint": "emulator/echo", "arguments": {"output": {}, "files": [{"size": 4096}]}},
    ]
    state = _run(requests, run_key)
    assert state.is_completed(), state.message
    summary = state.result()
    assert isinstance(summary, RunSummary)
    assert summary.deleted == 3  # the two identical requests are two jobs
    request_ids = {r.request_id for r in _records(flow_env, run_key)}
    assert len(request_ids) == 3
    held = emulator.inventory(hashes=False)
    assert not request_ids & set(held["payloads"])
    assert not [f for f in held["files"] if f["request_id"] in request_ids]

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    artifacts = asyncio.run(_artifacts(flow_run_id))
    table = artifacts[artifact_key("requests", "falflow-requests")]
    assert "deleted" in str(table)
    assert artifacts[artifact_key("progress", "falflow-requests")] == 100.0

    secrets = (emulator.api_key, emulator.admin_key)
    text = "\n".join(all_logs) + str(artifacts) + _everything_in(flow_env)
    assert "archived request" in text  # the logs were captured
    assert "fal: Echoing" in text  # fal's own log lines, at debug
    for secret in secrets:
        assert secret not in text

    # Nor in the Prefect API's database (the whole session's runs), once the run's last log line
    # is in it: the scan finds the run key (a flow run parameter) and that line.
    deadline = time.monotonic() + 30
    while not asyncio.run(_logged(flow_run_id, f"cleanup of run {run_key}")):
        assert time.monotonic() < deadline, "the cleanup's log line never reached the API"
        time.sleep(0.2)
    database = _harness_database()
    assert _holding(database, run_key)
    assert _holding(database, f"cleanup of run {run_key}")
    for secret in secrets:
        assert _holding(database, secret) == []


def test_unverified_archive_fails_the_flow_and_is_not_deleted(
    emulator: RunningEmulator,
    flow_env: Path,
    faults: Callable[..., None],
    all_logs: list[str],
) -> None:
    run_key = "flow-truncated"
    requests = [
        {"endpoint": "emulator/echo", "arguments": {"output": {}, "files": [{"size": 9000}]}}
    ]
    faults(truncated_download=1.0)
    state = _run(requests, run_key)
    assert state.is_failed()
    with pytest.raises(RunFailed, match="after 4 attempts") as caught:
        state.result()
    (kept,) = caught.value.summary.unverified
    assert kept.state == "completed"
    assert kept.request_id in emulator.inventory(hashes=False)["payloads"]
    text = "\n".join(all_logs) + str(caught.value) + _everything_in(flow_env)
    for secret in (emulator.api_key, emulator.admin_key):
        assert secret not in text


def test_allow_unverified_lets_the_flow_complete_but_still_keeps_the_request(
    emulator: RunningEmulator,
    flow_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FALFLOW_RETENTION__ALLOW_UNVERIFIED", "true")
    requests = [
        {"endpoint": "emulator/echo", "arguments": {"output": {"u": "https://evil.example/x"}}}
    ]
    state = _run(requests, "flow-allowed")
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.deleted == 0
    (kept,) = summary.unverified
    assert kept.request_id in emulator.inventory(hashes=False)["payloads"]


def test_rerun_of_a_half_finished_run_submits_nothing_twice(
    emulator: RunningEmulator, flow_env: Path, faults: Callable[..., None]
) -> None:
    run_key = "flow-rerun"
    requests = [
        {"endpoint": "emulator/echo", "arguments": {"output": {"n": n}, "files": [{"size": 3000}]}}
        for n in range(4)
    ]
    before = _echo_count(emulator)
    faults(truncated_download=1.0)  # a half-finished run: two requests done on fal, not archived
    first = _run(requests[:2], run_key)
    assert first.is_failed()
    faults()
    second = _run(requests, run_key)
    assert second.is_completed(), second.message
    assert second.result().deleted == 4
    assert _echo_count(emulator) - before == 4
