"""Run keys written by an earlier falflow resume: the job ids are derived the same way, so a
resumed run finds every ledger record and submits nothing again."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from prefect import flow

from falflow.emulator import RunningEmulator
from falflow.flows.dsl import generate, ref
from falflow.flows.pipeline import run_pipeline
from falflow.flows.scope import retention_scope
from falflow.flows.summary import RunSummary

WRITTEN_BY_0_1_0 = Path(__file__).parent / "data" / "bucket-0.1.0"

SPEC = """
name: resume
params:
  words: {type: list, default: ["alpha", "beta"]}
steps:
  - name: first
    endpoint: emulator/echo
    for_each: "{{ params.words }}"
    arguments: {output: {word: "{{ item }}"}, files: [{size: 64}]}
  - name: second
    endpoint: emulator/echo
    for_each: "{{ steps.first }}"
    arguments: {output: {from: "{{ item.files[0].url }}"}}
"""


@flow(name="resume-dsl")
async def dsl() -> RunSummary | None:
    """The flow that wrote ``resume-dsl``: identical requests in one step and across steps."""
    async with retention_scope(run_key="resume-dsl") as scope:
        a = generate("emulator/echo", {"output": {"n": 1}, "files": [{"size": 32}]}, name="a")
        generate("emulator/echo", {"output": {"n": 1}, "files": [{"size": 32}]}, name="a")
        generate("emulator/echo", {"output": {"n": 1}, "files": [{"size": 32}]}, name="b")
        c = generate("emulator/echo", {"output": {"up": ref(a, "files[0].url")}}, name="c")
        await c
    return scope.summary


def _ledger(archive: Path) -> set[str]:
    return {str(p.relative_to(archive)) for p in (archive / "ledger").rglob("*.json")}


def test_runs_written_by_falflow_0_1_0_resume_without_submitting(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    shutil.copytree(WRITTEN_BY_0_1_0, archive)
    recorded = _ledger(archive)
    assert len(recorded) == 8
    before = len(emulator.requests())

    spec = RunSummary.model_validate(asyncio.run(run_pipeline(SPEC, run_key="resume-spec")))
    python = asyncio.run(dsl())

    assert len(emulator.requests()) == before  # nothing submitted again
    assert _ledger(archive) == recorded  # the same job ids: no new record
    assert python is not None
    for summary in (spec, python):
        assert summary.ok, "\n".join(summary.problem_lines())
        assert (summary.archived, summary.deleted) == (4, 4)
