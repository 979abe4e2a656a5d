"""Sharded runs: how a batch is split (never a chain), which specs cannot be, the shards' summaries
as one report, and a sharded pipeline in this process (no work pool) end to end on the emulator.
The work pool side (child flow runs on workers, a lost worker) is in tests/e2e/test_e2e_scale.py."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from falflow.emulator import RunningEmulator
from falflow.flows.pipeline import run_pipeline
from falflow.flows.shards import (
    Shard,
    ShardOutcome,
    gather,
    plan_shards,
    restart_delay,
)
from falflow.flows.spec import SpecError, load_pipeline
from falflow.flows.summary import Problem, RunFailed, RunSummary
from falflow.settings import RetentionSettings
from falflow.tasks.ledger import shard_run_key
from falflow.tasks.lost import LISTING_LAG
from falflow.tasks.models import JobState
from tests.flows.test_runs import ledger, left_on_fal, read_json

FLUX, ESRGAN = "fal-ai/flux/schnell", "fal-ai/esrgan"


def step(name: str, endpoint: str = FLUX, **fields: Any) -> dict[str, Any]:
    return {"name": name, "endpoint": endpoint, "arguments": {"prompt": "x"}, **fields}


def test_a_parameter_list_is_cut_into_shards_and_chains_stay_whole() -> None:
    pipeline = load_pipeline("sample")
    params = pipeline.bind({"prompts": [f"p{i}" for i in range(5)]})
    shards = plan_shards(pipeline, params, 2, "nightly")
    assert [(s.run_key, s.start, s.stop) for s in shards] == [
        ("nightly.shard-0", 0, 2),
        ("nightly.shard-1", 2, 4),
        ("nightly.shard-2", 4, 5),
    ]
    assert [s.parameters["prompts"] for s in shards] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert {s.parameters["motion"] for s in shards} == {params["motion"]}  # the rest as given
    # the shard's spec is the parent's own: upscale and video follow image item by item
    assert all(s.spec_for(pipeline, "sample") == "sample" for s in shards)
    assert plan_shards(pipeline, params, 5, "nightly")[0].parameters == params


def test_a_list_written_in_the_spec_is_cut_in_the_shards_spec() -> None:
    spec = {
        "name": "written",
        "steps": [
            step("image", for_each=["a", "b", "c"], arguments={"prompt": "{{ item }}"}),
            step(
                "upscale",
                ESRGAN,
                for_each="{{ steps.image }}",
                arguments={"image_url": "{{ item.images[0].url }}"},
            ),
        ],
    }
    pipeline = load_pipeline(spec)
    shards = plan_shards(pipeline, pipeline.bind({}), 2, "w")
    specs = [s.spec_for(pipeline, spec) for s in shards]
    assert [s["steps"][0]["for_each"] for s in specs if isinstance(s, dict)] == [["a", "b"], ["c"]]
    assert [s["steps"][1]["for_each"] for s in specs if isinstance(s, dict)] == [
        "{{ steps.image }}"
    ] * 2
    assert [load_pipeline(s).spec.steps[0].for_each for s in specs] == [["a", "b"], ["c"]]


@pytest.mark.parametrize(
    ("steps", "parameters", "expected"),
    [
        ([step("once")], {}, "step 'once' runs once; every shard would run it again"),
        (
            [
                step("image", for_each="{{ params.prompts }}"),
                step("grid", arguments={"prompt": "{{ steps.image }}"}),
            ],
            {"prompts": ["a"]},
            "step 'grid' needs all of image",
        ),
        (
            [step("image", for_each="{{ params.prompts }}", arguments={"seed": "{{ index }}"})],
            {"prompts": ["a"]},
            "step 'image' uses {{ index }}, which a shard would count from 0 again",
        ),
        (
            [
                step("image", for_each="{{ params.prompts }}"),
                step("other", for_each=["x"]),
            ],
            {"prompts": ["a", "b"]},
            "lists of different lengths (params.prompts: 2, step 'other': 1)",
        ),
        (
            [
                step(
                    "image",
                    for_each="{{ params.prompts }}",
                    arguments={"all": "{{ params.prompts }}"},
                )
            ],
            {"prompts": ["a"]},
            "step 'image' reads {{ params.prompts }} beyond for_each",
        ),
    ],
)
def test_a_spec_a_shard_would_change_is_refused_naming_the_step(
    steps: list[dict[str, Any]], parameters: dict[str, Any], expected: str
) -> None:
    spec = {"params": {"prompts": {"type": "list", "default": []}}, "steps": steps}
    pipeline = load_pipeline(spec)
    with pytest.raises(SpecError) as caught:
        plan_shards(pipeline, pipeline.bind(parameters), 10, "key")
    assert expected in str(caught.value)


def test_shard_run_keys_are_one_bucket_key_segment() -> None:
    assert shard_run_key("nightly-2025-01-31", 12) == "nightly-2025-01-31.shard-12"
    with pytest.raises(ValueError, match="shard run key"):
        shard_run_key("k" * 115, 0)
    pipeline = load_pipeline("sample")
    with pytest.raises(ValueError, match="shard size must be at least 1"):
        plan_shards(pipeline, pipeline.bind({}), 0, "key")


def summary(run_key: str, **fields: Any) -> RunSummary:
    base: dict[str, Any] = {
        "run_key": run_key,
        "bucket": "file:///b",
        "requests": 4,
        "archived": 4,
        "archived_files": 4,
        "archived_bytes": 100,
        "deleted": 4,
        "failed": [],
        "skipped": [],
        "unverified": [],
        "not_deleted": [],
        "ok": True,
    }
    return RunSummary(**(base | fields))


def test_the_shards_summaries_make_one_report_naming_items_in_the_whole_batch() -> None:
    def shard(index: int) -> Shard:
        return Shard(index, f"k.shard-{index}", 2 * index, 2 * index + 2, {})

    failed = Problem(job="image-1-abc", item="image[1]", state="failed", error="refused")
    outcomes = [
        ShardOutcome(shard(0), "id-0", "COMPLETED", summary=summary("k.shard-0")),
        ShardOutcome(
            shard(1),
            "id-1",
            "FAILED",
            summary=summary(
                "k.shard-1",
                requests=3,
                archived=2,
                failed=[failed],
                skipped=[Problem(job="upscale[1]", state="skipped")],
                ok=False,
            ),
        ),
        ShardOutcome(shard(2), "id-2", "CRASHED", message="lost its worker", attempts=3),
    ]
    merged = gather(outcomes, "k", "file:///b")
    assert (merged.requests, merged.archived, merged.deleted) == (7, 6, 8)
    assert [(p.job, p.item) for p in merged.failed] == [
        ("image-1-abc", "image[3]"),  # item 1 of the shard starting at item 2
        ("k.shard-2", "shard 2 (items 4-5)"),
    ]
    assert merged.failed[1].error == "lost its worker"
    assert [p.item for p in merged.skipped] == ["upscale[3]"]
    assert not merged.ok
    assert gather(outcomes[:1], "k", "file:///b").ok
    assert merged.folder("ledger") == "file:///b/ledger/k.shard-<0..2>/"  # each shard's own


def test_a_sharded_pipeline_without_a_work_pool_runs_its_shards_here_one_after_another(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    prompts = ["a red fox", "a lighthouse", "a paper boat", "a koi pond", "a neon alley"]
    result = asyncio.run(
        run_pipeline("sample", {"prompts": prompts}, run_key="sharded", shard_size=2)
    )
    merged = RunSummary.model_validate(result)
    assert merged.ok, merged.problem_lines()
    assert (merged.run_key, merged.requests, merged.archived, merged.deleted) == (
        "sharded",
        15,
        15,
        15,
    )
    request_ids: set[str] = set()
    for index, shard_prompts in enumerate([prompts[0:2], prompts[2:4], prompts[4:]]):
        records = ledger(archive, f"sharded.shard-{index}")
        assert len(records) == 3 * len(shard_prompts)  # image, upscale, video of each item
        assert {r.state for r in records.values()} == {JobState.DELETED}
        images = [r for r in records.values() if r.endpoint == FLUX]
        asked = sorted(read_json(archive, r.input_key)["prompt"] for r in images)
        assert asked == sorted(shard_prompts)
        for record in records.values():
            request_ids.add(record.request_id or "")
            for stored in record.objects:
                data = (archive / stored.key).read_bytes()
                assert hashlib.sha256(data).hexdigest() == stored.sha256
    assert not (archive / "ledger" / "sharded").exists()  # the parent submits nothing itself
    assert left_on_fal(emulator, request_ids) == []

    # the same run key again: every shard resumes from its ledger, nothing is submitted again
    before = len(emulator.requests())
    again = asyncio.run(
        run_pipeline("sample", {"prompts": prompts}, run_key="sharded", shard_size=2)
    )
    assert RunSummary.model_validate(again).ok
    assert len(emulator.requests()) == before


def test_a_failed_item_fails_the_sharded_run_named_by_its_place_in_the_batch(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    prompts = ["a koi pond", "a neon alley", "a forbidden garden"]  # the emulator refuses item 2
    with pytest.raises(RunFailed) as caught:
        asyncio.run(
            run_pipeline("sample", {"prompts": prompts}, run_key="sharded-fail", shard_size=2)
        )
    merged = caught.value.summary
    assert [p.item for p in merged.failed] == ["image[2]"]
    assert sorted(p.item for p in merged.skipped) == ["upscale[2]", "video[2]"]
    assert (merged.requests, merged.archived, merged.deleted) == (7, 6, 6)
    assert {r.state for r in ledger(archive, "sharded-fail.shard-0").values()} == {JobState.DELETED}


def test_a_crashed_shard_waits_until_its_lost_submits_are_provably_not_on_fal() -> None:
    pipeline = load_pipeline("sample")
    assert restart_delay(pipeline, RetentionSettings()) == 600 + LISTING_LAG.total_seconds()
    spec = {"steps": [step("image", for_each=["a"], retention={"start_timeout_seconds": 900})]}
    assert restart_delay(load_pipeline(spec), RetentionSettings(start_timeout_seconds=30)) == (
        900 + LISTING_LAG.total_seconds()
    )
