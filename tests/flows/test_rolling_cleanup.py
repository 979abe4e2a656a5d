"""Rolling cleanup: fal's copy of a request goes seconds after its last reader, mid-run.

Two chains run side by side: chain 0 is quick, chain 1's first request takes seconds. Polled
while the run goes on, the emulator shows chain 0's payloads and files gone while chain 1 is still
running, each of chain 0's requests deleted only after the request reading it finished, and
chain 1's readers all succeed (nothing they needed was deleted under them).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import anyio

from falflow.emulator import RunningEmulator
from falflow.flows.pipeline import run_pipeline
from falflow.flows.summary import RunSummary
from tests.flows.test_runs import item, ledger, left_on_fal

SLOW_SECONDS = 8.0
SPEC: dict[str, Any] = {
    "name": "rolling",
    "params": {"chains": {"type": "list"}},
    "steps": [
        {
            "name": "image",
            "endpoint": "emulator/echo",
            "for_each": "{{ params.chains }}",
            "arguments": {
                "output": {"chain": "{{ index }}"},
                "files": [{"size": 4096, "file_name": "image.png"}],
                "latency_seconds": "{{ item.seconds }}",
            },
        },
        {
            "name": "upscale",
            "endpoint": "fal-ai/esrgan",
            "for_each": "{{ steps.image }}",
            "arguments": {"image_url": "{{ item.files[0].url }}"},
        },
        {
            "name": "caption",
            "endpoint": "emulator/echo",
            "for_each": "{{ steps.upscale }}",
            "arguments": {
                "output": {"of": "{{ item.image.url }}"},
                "latency_seconds": 1.5,
            },
        },
    ],
}


def test_an_early_chain_leaves_fal_while_a_later_one_still_runs(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    chains = [{"seconds": 0}, {"seconds": SLOW_SECONDS}]
    seen: list[dict[str, Any]] = []

    async def main() -> RunSummary:
        async with anyio.create_task_group() as tg:

            async def poll() -> None:
                while True:
                    seen.append(await anyio.to_thread.run_sync(emulator.requests))
                    await anyio.sleep(0.25)

            tg.start_soon(poll)
            summary = await run_pipeline(SPEC, {"chains": chains}, run_key="rolling")
            tg.cancel_scope.cancel()
        return RunSummary.model_validate(summary)

    summary = asyncio.run(main())
    assert summary.ok, "\n".join(summary.problem_lines())
    records = ledger(archive, "rolling")
    quick = [item(records, step, 0) for step in ("image", "upscale", "caption")]
    slow_image = item(records, "image", 1)

    # some poll saw all of chain 0 deleted from fal while chain 1's image was still running
    quick_ids = {r.request_id for r in quick}
    mid_run = [
        snapshot
        for snapshot in seen
        if all(r["payloads_deleted"] for r in snapshot if r["request_id"] in quick_ids)
        and {r["request_id"] for r in snapshot} >= quick_ids
        and any(
            r["request_id"] == slow_image.request_id and r["status"] != "COMPLETED"
            for r in snapshot
        )
    ]
    assert mid_run, "chain 0 was still on fal when chain 1's image finished"

    # each request left fal only after the request reading it had finished
    for upstream, reader in itertools.pairwise(quick):
        assert upstream.deleted_at is not None
        assert reader.finished_at is not None
        assert upstream.deleted_at > reader.finished_at, (upstream.job_id, reader.job_id)
    # and within seconds of it (the emulator lists a request 2 s late: two confirmation rounds)
    last_reader = quick[-1].finished_at
    assert quick[-1].deleted_at is not None
    assert last_reader is not None
    assert (quick[-1].deleted_at - last_reader).total_seconds() < SLOW_SECONDS

    assert left_on_fal(emulator, {r.request_id for r in records.values() if r.request_id}) == []
