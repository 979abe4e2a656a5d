"""The run page a Prefect user reads: the sample with one refused prompt (one failed, two
skipped) on the test harness, its artifacts, task-run names, logs, state and persisted result
read back through the API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import State

from falflow.flows.pipeline import run_pipeline
from falflow.flows.summary import RunFailed, RunSummary
from falflow.tasks.report import artifact_key

pytestmark = pytest.mark.usefixtures("prefect_harness")

PROMPTS = ["a red fox", "a forbidden door", "a lighthouse at dusk"]
"""The emulator refuses a prompt with ``forbidden`` (content_policy_violation)."""


@pytest.fixture
def flow_env(archive: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FALFLOW_LIMITS__POLL_INTERVAL_SECONDS", "0.05")
    return archive


async def _page(flow_run_id: UUID) -> dict[str, Any]:
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        task_runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return {
        "artifacts": {a.key: a for a in artifacts if a.key},  # (Prefect's result has none)
        "task_runs": {t.name: t for t in task_runs},
        "logs": logs,
    }


def test_the_run_page_tells_what_happened_to_every_planned_request(flow_env: Path) -> None:
    called = run_pipeline("sample", {"prompts": PROMPTS}, run_key="page", return_state=True)
    state: State[Any] = asyncio.run(called)  # type: ignore[arg-type]
    assert state.is_failed()
    # one readable line naming the failure; no traceback, no escaped newlines
    assert state.message is not None
    assert "\n" not in state.message
    assert "Traceback" not in state.message
    assert "image[1]" in state.message
    assert "content_policy_violation" in state.message
    # the persisted result keeps the summary of a failed run (JSON, read back from storage)
    failed = asyncio.run(state.aresult(raise_on_failure=False))
    assert isinstance(failed, RunFailed)
    assert len(failed.summary.failed) == 1
    assert len(failed.summary.skipped) == 2
    with pytest.raises(RunFailed):
        asyncio.run(state.aresult())

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    page = asyncio.run(_page(flow_run_id))
    artifacts = page["artifacts"]
    assert set(artifacts) == {
        artifact_key(kind, "sample") for kind in ("summary", "requests", "progress")
    }
    assert artifact_key("summary", "sample") == "falflow-sample-summary"

    rows = artifacts["falflow-sample-requests"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["item"] for r in rows] == [
        f"{step}[{i}]" for step in ("image", "upscale", "video") for i in range(3)
    ]
    assert list(rows[0]) == ["item", "state", "problem", "size", "archive"]
    by_item = {r["item"]: r for r in rows}
    assert by_item["image[1]"]["state"] == "failed"
    assert "content_policy_violation" in by_item["image[1]"]["problem"]
    for skipped in ("upscale[1]", "video[1]"):
        assert by_item[skipped]["state"] == "skipped"
        assert by_item[skipped]["problem"].startswith("not run:")
    for item in ("image[0]", "upscale[2]", "video[0]"):
        assert by_item[item]["state"] == "deleted"
        assert by_item[item]["problem"] == ""
        assert by_item[item]["size"].endswith(("KB", "MB"))
        assert by_item[item]["archive"]
        assert not by_item[item]["archive"].startswith("runs/")
    assert max(len(v) for r in rows for v in r.values()) <= 60  # narrow

    progress = artifacts["falflow-sample-progress"]
    assert progress.data == pytest.approx(100 * 6 / 9)
    assert progress.description.startswith("6 ok · 1 failed · 2 skipped")

    markdown = artifacts["falflow-sample-summary"].data
    archive_url = flow_env.as_uri()
    assert f"`{archive_url}/runs/page/`" in markdown
    assert "6 ok · 1 failed · 2 skipped" in markdown
    assert "**Deleted from fal** 6 requests" in markdown
    assert "`image[1]` fal-ai/flux/schnell: content_policy_violation" in markdown
    assert "`upscale[1]` fal-ai/esrgan: not run: image[1] did not finish" in markdown
    assert " MB" in markdown or " KB" in markdown

    names = set(page["task_runs"])
    assert {"image #1", "upscale #1", "video #1", "cleanup"} <= names, names
    assert page["task_runs"]["image #1"].state.message.startswith("1 of 3 requests failed")
    warnings = [log.message for log in page["logs"] if log.level == 30]
    assert [w for w in warnings if "content_policy_violation" in w] == [
        next(w for w in warnings if w.startswith("image[1]: fal request"))
    ]
    assert not [log.message for log in page["logs"] if "Traceback" in log.message]


def test_a_completed_run_persists_its_summary_as_json(flow_env: Path) -> None:
    called = run_pipeline("sample", {"prompts": ["a koi pond"]}, run_key="ok", return_state=True)
    state: State[Any] = asyncio.run(called)  # type: ignore[arg-type]
    assert state.is_completed(), state.message
    summary = RunSummary.model_validate(asyncio.run(state.aresult()))
    assert summary.ok
    assert summary.deleted == 3
