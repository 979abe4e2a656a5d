"""A request never gets a dead URL: an earlier output whose fal copy falflow deleted is served
again from the archive (re-run with changed arguments), and a request fal failed on such an
input is submitted again with a live one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from falflow.emulator import RunningEmulator
from falflow.flows.pipeline import run_pipeline
from falflow.flows.summary import RunSummary
from falflow.settings import BucketSettings, load_settings
from falflow.tasks.cleanup import cleanup
from falflow.tasks.jobs import run_job
from falflow.tasks.ledger import Ledger
from falflow.tasks.models import DeletionResult, Job, JobRecord, JobState, job_id_for, utcnow
from falflow.tasks.runtime import open_runtime
from falflow.tasks.store import open_bucket

SPEC = """
name: reserve
steps:
  - name: image
    endpoint: fal-ai/flux/schnell
    arguments: {prompt: "a lighthouse at dusk", image_size: square}
  - name: upscale
    endpoint: fal-ai/esrgan
    arguments: {image_url: "{{ steps.image.images[0].url }}", scale: SCALE}
"""


def _records(archive: Path, run_key: str) -> list[JobRecord]:
    return [
        JobRecord.model_validate_json(p.read_bytes())
        for p in (archive / "ledger" / run_key).glob("*.json")
    ]


def _inputs(emulator: RunningEmulator, endpoint: str) -> list[dict[str, Any]]:
    return [r["arguments"] for r in emulator.requests() if r["endpoint_id"] == endpoint]


def test_a_rerun_with_changed_arguments_gets_the_archived_copy_not_a_dead_url(
    prefect_harness: None, emulator: RunningEmulator, archive: Path
) -> None:
    first = RunSummary.model_validate(
        asyncio.run(run_pipeline(SPEC.replace("SCALE", "2"), run_key="reserve"))
    )
    assert first.ok
    [image] = [r for r in _records(archive, "reserve") if r.endpoint.endswith("schnell")]
    assert image.state is JobState.DELETED  # its fal URL is dead now
    dead = image.objects[0].source_url
    before = len(emulator.requests())

    second = RunSummary.model_validate(
        asyncio.run(run_pipeline(SPEC.replace("SCALE", "4"), run_key="reserve"))
    )
    assert second.ok, "\n".join(second.problem_lines())
    made = emulator.requests()[before:]
    assert [r["endpoint_id"] for r in made] == ["fal-ai/esrgan"]  # the image is not made again
    live = made[0]["arguments"]["image_url"].split("?")[0]
    assert live != dead  # never the dead URL...
    upscaled = [r for r in _records(archive, "reserve") if r.reserved_inputs]
    assert [r.reserved_inputs for r in upscaled] == [{dead: live}]  # ...but the archived copy
    uploads = [f for f in emulator.inventory(hashes=False)["files"] if f["url"] == live]
    assert [f["acl"] for f in uploads] == ["hide"]  # the re-upload is hidden once the run ends


def test_on_s3_a_rerun_gets_a_presigned_url_of_the_archived_copy(
    prefect_harness: None,
    emulator: RunningEmulator,
    archive: Path,
    s3_bucket: BucketSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bucket that can sign hands fal a short-lived presigned URL: nothing is uploaded to fal
    again, and the signature never reaches the ledger."""
    for name, value in s3_bucket.model_dump(exclude_none=True).items():
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        monkeypatch.setenv(f"FALFLOW_BUCKET__{name.upper()}", str(plain))
    run_key = "reserve-s3"
    first = RunSummary.model_validate(
        asyncio.run(run_pipeline(SPEC.replace("SCALE", "2"), run_key=run_key))
    )
    assert first.ok
    files_before = {f["url"] for f in emulator.inventory(hashes=False)["files"]}
    before = len(emulator.requests())

    second = RunSummary.model_validate(
        asyncio.run(run_pipeline(SPEC.replace("SCALE", "4"), run_key=run_key))
    )
    assert second.ok, "\n".join(second.problem_lines())
    made = emulator.requests()[before:]
    assert [r["endpoint_id"] for r in made] == ["fal-ai/esrgan"]
    sent = made[0]["arguments"]["image_url"]
    assert sent.startswith(s3_bucket.endpoint or "")  # the bucket's own URL, presigned
    assert "X-Amz-Signature=" in sent
    assert made[0]["status"] == "COMPLETED"  # fal (the emulator) could read it
    new_files = {f["url"] for f in emulator.inventory(hashes=False)["files"]} - files_before
    assert new_files == set()  # nothing re-uploaded, and the new output deleted
    ledger_text = " ".join(json.dumps(r.reserved_inputs) for r in _records_s3(s3_bucket, run_key))
    assert "(presigned)" in ledger_text
    assert "X-Amz-Signature" not in ledger_text


def _records_s3(bucket: BucketSettings, run_key: str) -> list[JobRecord]:
    async def read() -> list[JobRecord]:
        ledger = Ledger(open_bucket(bucket))
        return [record async for record in ledger.list(run_key)]

    return anyio.run(read)


def test_a_request_fal_failed_on_a_deleted_input_is_submitted_again_with_a_live_one(
    emulator: RunningEmulator, archive: Path
) -> None:
    settings = load_settings()
    run_key = "reserve-retry"

    async def main() -> JobRecord:
        async with open_runtime(settings, run_key) as rt:
            image_job = Job(
                job_id=job_id_for(run_key, "image", "fal-ai/flux/schnell", {"prompt": "a kite"}),
                endpoint="fal-ai/flux/schnell",
                arguments={"prompt": "a kite"},
                policy=settings.retention.policy_for("fal-ai/flux/schnell"),
            )
            image = await run_job(rt, image_job)
            report = await cleanup(rt, [image.record])  # its fal copy is gone
            assert report.deleted == [image_job.job_id]
            url = image.record.objects[0].source_url
            arguments = {"image_url": url}
            job = Job(
                job_id=job_id_for(run_key, "upscale", "fal-ai/esrgan", arguments),
                endpoint="fal-ai/esrgan",
                arguments=arguments,
                policy=settings.retention.policy_for("fal-ai/esrgan"),
            )
            # what an earlier falflow left: fal failed it on that dead URL, and it is gone
            failed = JobRecord(
                job_id=job.job_id, run_key=run_key, endpoint=job.endpoint, policy=job.policy
            ).moved_to(
                JobState.FAILED,
                request_id="an-earlier-request",
                error_type="file_download_error",
                error="Failed to download the file",
                deletion=DeletionResult(status_code=200, confirmed_at=utcnow()),
            )
            await rt.ledger.put(failed)
            rt.gone = None  # the index of deleted outputs is read again
            return (await run_job(rt, job)).record

    before = len(_inputs(emulator, "fal-ai/esrgan"))
    record = anyio.run(main)
    assert record.state is JobState.ARCHIVED
    assert JobState.FAILED in [state for state, _ in record.history]
    [sent] = _inputs(emulator, "fal-ai/esrgan")[before:]
    [(dead, live)] = record.reserved_inputs.items()
    assert sent["image_url"].split("?")[0] == live != dead
