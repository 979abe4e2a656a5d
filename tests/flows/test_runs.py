"""Generation DAGs end to end on the emulator: the shipped sample, the Python API, failures
mid-DAG, invalid specs, and cleanup strictly after every step."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from falflow.emulator import RunningEmulator
from falflow.flows.dsl import generate, ref, retained
from falflow.flows.pipeline import run_pipeline
from falflow.flows.scope import watching
from falflow.flows.spec import SpecError
from falflow.flows.summary import RunFailed, RunProgress, RunSummary
from falflow.tasks.lanes import LANE_IDLE_SECONDS
from falflow.tasks.models import JobRecord, JobState

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a paper boat"]


def ledger(archive: Path, run_key: str) -> dict[str, JobRecord]:
    folder = archive / "ledger" / run_key
    records = [JobRecord.model_validate_json(p.read_bytes()) for p in folder.glob("*.json")]
    return {r.job_id: r for r in records}


def item(records: dict[str, JobRecord], step: str, index: int) -> JobRecord:
    """The record of item ``index`` of ``step`` (its id also hashes the arguments)."""
    [found] = [r for r in records.values() if r.job_id.startswith(f"{step}-{index}-")]
    return found


def read_json(archive: Path, key: str | None) -> Any:
    assert key is not None
    return json.loads((archive / key).read_bytes())


def left_on_fal(emulator: RunningEmulator, request_ids: set[str]) -> list[str]:
    """What the emulator still holds of these requests: stored payloads and output files."""
    inventory = emulator.inventory()
    held = [f"payload {r}" for r in inventory["payloads"] if r in request_ids]
    held += [f"file {f['url']}" for f in inventory["files"] if f.get("request_id") in request_ids]
    return held


def task_run_names(run_key: str) -> list[str]:
    """Task runs recorded for the flow run whose id ends the default run key."""
    flow_run_id = run_key[-36:]  # <flow or spec name>-<flow run id>

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
            )
            return sorted(run.name for run in runs)

    return asyncio.run(read())


def test_sample_runs_end_to_end_item_by_item_in_batched_task_runs(
    prefect_harness: None, emulator: RunningEmulator, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FALFLOW_LIMITS__JOBS_PER_TASK_RUN", "2")
    summary = RunSummary.model_validate(asyncio.run(run_pipeline("sample", {"prompts": PROMPTS})))
    run_key = summary.run_key

    assert summary.ok, "\n".join(summary.problem_lines())
    assert (summary.requests, summary.archived, summary.deleted) == (9, 9, 9)
    records = ledger(archive, run_key)
    assert {r.state for r in records.values()} == {JobState.DELETED}
    for index, prompt in enumerate(PROMPTS):
        image = item(records, "image", index)
        upscale = item(records, "upscale", index)
        video = item(records, "video", index)
        # item i of each step read item i of the step before (fal's URL, before cleanup)
        assert read_json(archive, image.input_key)["prompt"] == prompt
        image_url = read_json(archive, image.output_key)["images"][0]["url"]
        assert read_json(archive, upscale.input_key)["image_url"] == image_url
        upscaled_url = read_json(archive, upscale.output_key)["image"]["url"]
        assert read_json(archive, video.input_key)["image_url"] == upscaled_url
        assert video.policy.media_ttl_seconds == 86400  # the step's retention override
        assert (
            image.headers_sent["X-Fal-Object-Lifecycle-Preference"]
            != (video.headers_sent["X-Fal-Object-Lifecycle-Preference"])
        )
    for record in records.values():
        for stored in record.objects:
            data = (archive / stored.key).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (stored.size, stored.sha256)
    assert summary.archived_bytes == sum(r.archived_bytes for r in records.values())
    assert left_on_fal(emulator, {r.request_id for r in records.values() if r.request_id}) == []

    # 3 requests per step at 2 per task run: 2 lanes per step, never 1 per request; rolling
    # deletions in batches while the run goes on, then the final cleanup
    names = task_run_names(run_key)
    lanes = [n for n in names if "#" in n and not n.startswith("cleanup")]
    assert lanes == [f"{step} #{n}" for step in ("image", "upscale", "video") for n in (1, 2)]
    assert names.count("cleanup") == 1
    assert 1 <= len([n for n in names if n.startswith("cleanup #")]) <= 9


def test_a_failed_item_mid_dag_leaves_its_siblings_archived_and_cleaned(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    prompts = ["a koi pond", "a forbidden garden", "a neon alley"]
    with pytest.raises(RunFailed) as caught:
        asyncio.run(run_pipeline("sample", {"prompts": prompts}, run_key="mid-dag-failure"))
    summary = caught.value.summary

    records = ledger(archive, "mid-dag-failure")
    failed = item(records, "image", 1).job_id
    assert [p.job for p in summary.failed] == [failed]
    assert "content_policy_violation" in summary.failed[0].error
    assert sorted(p.job for p in summary.skipped) == ["upscale[1]", "video[1]"]
    assert "image[1] did not finish" in summary.skipped[0].error
    assert (summary.requests, summary.archived, summary.deleted) == (7, 6, 6)
    assert summary.unverified == []
    assert not summary.ok

    assert records.pop(failed).state is JobState.FAILED
    assert len(records) == 6
    assert {r.state for r in records.values()} == {JobState.DELETED}
    assert left_on_fal(emulator, {r.request_id for r in records.values() if r.request_id}) == []
    assert "mid-dag-failure" in str(caught.value)
    assert "failed: image[1]" in str(caught.value)  # the item, as the run page names it


@pytest.mark.parametrize(
    ("spec", "parameters", "expected"),
    [
        (
            {
                "steps": [
                    {"name": "a", "endpoint": "fal-ai/flux/schnell", "arguments": {"prompt": "x"}},
                    {
                        "name": "b",
                        "endpoint": "fal-ai/esrgan",
                        "arguments": {"image_url": "{{ steps.c.images[0].url }}"},
                    },
                ]
            },
            None,
            "step 'b', field 'arguments': unknown step in {{ steps.c.images[0].url }}",
        ),
        ("sample", {"prompts": "not a list"}, "parameter 'prompts': Input should be a valid list"),
        (
            {"steps": [{"name": "a", "endpoint": "fal-ai/flux/schnell", "retention": {"x": 1}}]},
            None,
            "step 'a' (steps[0]), field 'retention.x': unknown field",
        ),
    ],
)
def test_invalid_specs_are_refused_before_any_submit(
    prefect_harness: None,
    emulator: RunningEmulator,
    archive: Path,
    spec: Any,
    parameters: dict[str, Any] | None,
    expected: str,
) -> None:
    before = len(emulator.requests())
    with pytest.raises(SpecError) as caught:
        asyncio.run(run_pipeline(spec, parameters))
    assert expected in str(caught.value)
    assert len(emulator.requests()) == before
    assert not archive.exists()  # not even the bucket was opened


@flow
@retained
async def late_reader(prompts: list[str]) -> list[str]:
    images = [generate("fal-ai/flux/schnell", {"prompt": p}, name="image") for p in prompts]
    await asyncio.gather(*images)
    # Every image is archived and its lane is over: a cleanup per step would have run by now.
    await anyio.sleep(LANE_IDLE_SECONDS + 0.5)
    upscales = [generate("fal-ai/esrgan", {"image_url": ref(i, "images[0].url")}) for i in images]
    return [(await u).output["image"]["url"] for u in upscales]


def test_a_step_reading_an_earlier_fal_url_is_never_broken_by_cleanup(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    urls = asyncio.run(late_reader(PROMPTS[:2]))
    assert len(urls) == 2
    [run_key] = [p.name for p in (archive / "ledger").iterdir()]
    records = ledger(archive, run_key)
    assert len(records) == 4
    assert {r.state for r in records.values()} == {JobState.DELETED}
    assert left_on_fal(emulator, {r.request_id for r in records.values() if r.request_id}) == []
    names = task_run_names(run_key)
    lanes = [n for n in names if "#" in n and not n.startswith("cleanup")]
    assert lanes == ["fal-ai/esrgan #1", "image #1"]


@flow
@retained
async def forgets_a_failure() -> str:
    generate("fal-ai/flux/schnell", {"prompt": "a forbidden door"})  # never awaited
    ok = await generate("fal-ai/flux/schnell", {"prompt": "an open door"})
    blocked = generate("fal-ai/esrgan", {"image_url": ref(generate("x-ai/none", {}), "url")})
    del blocked
    return str(ok.output["images"][0]["url"])


def test_an_unawaited_failure_fails_the_flow_after_cleanup(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    with pytest.raises(RunFailed) as caught:
        asyncio.run(forgets_a_failure())
    summary = caught.value.summary
    assert summary.deleted == 1
    assert summary.archived == 1
    assert sorted(p.endpoint for p in summary.failed) == ["fal-ai/flux/schnell", "x-ai/none"]
    assert [p.endpoint for p in summary.skipped] == ["fal-ai/esrgan"]
    assert "it refers to failed" in summary.skipped[0].error


KLING = "fal-ai/kling-video/v2.1/standard/image-to-video"


def test_a_cancelled_run_keeps_what_unfinished_steps_read_so_the_resumed_run_can(
    prefect_harness: None, emulator: RunningEmulator, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FALFLOW_LIMITS__MAX_IN_FLIGHT", "1")  # videos wait their turn unsubmitted
    latency = emulator.current_config().model_latency
    emulator.configure(model_latency={**latency, KLING: 3.0})
    progress = RunProgress()

    async def cancelled_once_images_and_upscales_are_archived() -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while progress.archived < 4:  # noqa: ASYNC110 (a plain counter, no event)
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            with watching(progress):
                await run_pipeline("sample", {"prompts": PROMPTS[:2]}, run_key="resumed")
            pytest.fail("the run finished before it was cancelled")

    try:
        asyncio.run(cancelled_once_images_and_upscales_are_archived())
    finally:
        emulator.configure(model_latency=latency)
    records = ledger(archive, "resumed")
    states: dict[str, set[JobState]] = {r.job_id.split("-")[0]: set() for r in records.values()}
    for record in records.values():
        states[record.job_id.split("-")[0]].add(record.state)
    # images: every reader (upscale) finished, so cleaned; upscales: videos still read them
    assert states["image"] == {JobState.DELETED}
    assert states["upscale"] == {JobState.ARCHIVED}
    upscales = {
        r.request_id for r in records.values() if r.job_id.startswith("upscale") and r.request_id
    }
    assert len(left_on_fal(emulator, upscales)) == 4  # 2 payloads + 2 files, for the resumed run
    unsubmitted = [i for i in (0, 1) if not any(j.startswith(f"video-{i}-") for j in records)]
    assert unsubmitted  # at most one video was in flight when the run was cancelled

    # a video in flight at the cancel was cancelled on fal: the resumed run submits it again
    cancelled = {r.request_id for r in records.values() if r.cancel_requested_at is not None}
    asyncio.run(run_pipeline("sample", {"prompts": PROMPTS[:2]}, run_key="resumed"))
    resumed = ledger(archive, "resumed")
    for index in unsubmitted:  # submitted by the resumed run, reading the kept upscale URL
        assert item(resumed, "video", index).state is JobState.DELETED
    assert {r.state for r in resumed.values()} == {JobState.DELETED}
    assert left_on_fal(emulator, upscales | cancelled) == []


GRID = """
name: grid
params:
  prompt: {type: string}
steps:
  - name: note            # written first, runs last: it needs every upscale
    endpoint: emulator/echo
    arguments:
      output: {text: "first upscale: {{ steps.upscale[0].image.url }}", count: "{{ params.n }}"}
  - name: grid
    endpoint: fal-ai/flux/schnell
    arguments: {prompt: "{{ params.prompt }}", num_images: "{{ params.n }}"}
  - name: upscale
    endpoint: fal-ai/esrgan
    for_each: "{{ steps.grid.images }}"   # fan-out over a list inside one output
    arguments: {image_url: "{{ item.url }}"}
"""


def test_fan_out_over_a_list_output_and_whole_step_references(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    spec = GRID.replace("params:\n", "params:\n  n: {type: integer, default: 2}\n")
    summary = RunSummary.model_validate(
        asyncio.run(run_pipeline(spec, {"prompt": "a tiled floor"}, run_key="grid"))
    )
    assert summary.ok, "\n".join(summary.problem_lines())
    assert (summary.requests, summary.deleted) == (4, 4)
    records = ledger(archive, "grid")
    grid = read_json(archive, item(records, "grid", 0).output_key)
    upscale = [read_json(archive, item(records, "upscale", i).input_key) for i in (0, 1)]
    assert [u["image_url"] for u in upscale] == [image["url"] for image in grid["images"]]
    note = read_json(archive, item(records, "note", 0).output_key)
    first = read_json(archive, item(records, "upscale", 0).output_key)["image"]["url"]
    assert note == {"text": f"first upscale: {first}", "count": 2}
