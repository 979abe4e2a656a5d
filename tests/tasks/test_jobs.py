"""The pipeline's plain functions end to end against the emulator (HTTPS) and real buckets."""

from __future__ import annotations

import hashlib
import json
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import obstore
import pytest

from falflow.emulator import RunningEmulator
from falflow.settings import BucketSettings, Settings, SettingsError
from falflow.tasks.cleanup import CleanupReport, cleanup
from falflow.tasks.jobs import JobFailed, JobOutcome, run_job
from falflow.tasks.lost import LISTING_LAG
from falflow.tasks.models import Job, JobRecord, JobState, utcnow
from falflow.tasks.platform import Pacer
from falflow.tasks.runtime import Runtime, open_runtime
from falflow.tasks.store import open_bucket
from falflow.tasks.submit import submit
from falflow.tasks.uploads import upload_input
from tests.support.fixtures import BUCKETS
from tests.support.jobs import run_jobs

SettingsFor = Callable[..., Settings]


def _png() -> bytes:
    """A tiny valid PNG (the emulator reads the size of an upscaled image from it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\x80\x80\x80" * 8 for _ in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _jobs(
    settings: Settings, run_key: str, specs: Sequence[tuple[str, dict[str, Any]]]
) -> list[Job]:
    return [
        Job(
            job_id=Job.make_id(run_key, "step", index),
            endpoint=endpoint,
            arguments=arguments,
            policy=settings.retention.policy_for(endpoint),
        )
        for index, (endpoint, arguments) in enumerate(specs)
    ]


def _records(outcomes: Sequence[JobOutcome], failures: Sequence[JobFailed]) -> list[JobRecord]:
    return [o.record for o in outcomes] + [f.record for f in failures]


def _echo_requests(emulator: RunningEmulator) -> int:
    return sum(r["endpoint_id"] == "emulator/echo" for r in emulator.requests())


def _files_of(inventory: dict[str, Any], request_ids: set[str]) -> list[dict[str, Any]]:
    return [f for f in inventory["files"] if f["request_id"] in request_ids]


@pytest.mark.parametrize("bucket_kind", BUCKETS)
def test_everything_archived_verified_then_deleted_from_fal(
    bucket_kind: str,
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    request: pytest.FixtureRequest,
) -> None:
    bucket = request.getfixturevalue(BUCKETS[bucket_kind])
    settings = settings_for(bucket, retention={"media_ttl_seconds": 3600})
    run_key = f"full-{bucket_kind}"

    async def main() -> tuple[list[JobOutcome], dict[str, Any], CleanupReport, Runtime, str]:
        async with open_runtime(settings, run_key) as rt:
            image_url = await upload_input(rt, _png(), content_type="image/png", file_name="in.png")
            jobs = _jobs(
                settings,
                run_key,
                [
                    ("fal-ai/flux/schnell", {"prompt": "a lighthouse at dusk", "num_images": 2}),
                    ("fal-ai/esrgan", {"image_url": image_url}),
                    (
                        "fal-ai/kling-video/v2.1/standard/image-to-video",
                        {"prompt": "slow push-in", "image_url": image_url},
                    ),
                    ("emulator/echo", {"output": {"text": "no files at all"}}),
                ],
            )
            outcomes, failures = await run_jobs(rt, jobs)
            assert failures == []
            before = emulator.inventory()
            report = await cleanup(rt, [o.record for o in outcomes])
            return outcomes, before, report, rt, image_url

    outcomes, before, report, rt, image_url = anyio.run(main)
    request_ids = {o.record.request_id for o in outcomes if o.record.request_id}
    assert len(request_ids) == 4
    fal_files = {f["url"]: f for f in _files_of(before, request_ids)}
    assert len(fal_files) == 4  # two images, one upscale, one video

    archived = [obj for o in outcomes for obj in o.record.objects]
    assert {obj.source_url for obj in archived} == set(fal_files)
    for obj in archived:
        assert obj.sha256 == fal_files[obj.source_url]["sha256"]
        assert obj.size == fal_files[obj.source_url]["size"]

    # The bucket holds the same bytes the ledger describes, plus the three JSON documents.
    async def read_back() -> dict[str, bytes]:
        store = open_bucket(bucket).store
        keys = [obj.key for obj in archived]
        for o in outcomes:
            keys += [
                o.record.input_key or "",
                o.record.output_key or "",
                o.record.archived_output_key or "",
            ]
        found = {}
        for key in keys:
            found[key] = bytes(await (await obstore.get_async(store, key)).bytes_async())
        return found

    stored = anyio.run(read_back)
    for obj in archived:
        assert hashlib.sha256(stored[obj.key]).hexdigest() == obj.sha256
        assert obj.store_etag  # the store's own tag for what it stored, from its answer
        if bucket.url.startswith("s3://"):  # single-part (these are small): the MD5
            assert (
                obj.store_etag.strip('"')
                == hashlib.md5(stored[obj.key], usedforsecurity=False).hexdigest()
            )
    flux = outcomes[0]
    assert json.loads(stored[flux.record.output_key or ""]) == flux.output
    assert json.loads(stored[flux.record.input_key or ""])["prompt"] == "a lighthouse at dusk"
    rewritten = json.loads(stored[flux.record.archived_output_key or ""])
    locations = {rt.bucket.location(obj.key) for obj in flux.record.objects}
    assert {image["url"] for image in rewritten["images"]} == locations
    assert flux.output is not None
    assert rewritten["seed"] == flux.output["seed"]

    # Every submit carried the policy's headers.
    described = [r for r in emulator.requests() if r["request_id"] in request_ids]
    assert {(r["output_ttl_seconds"], r["store_io"], r["priority"]) for r in described} == {
        (3600, True, "normal")
    }
    assert all(
        o.record.headers_sent["X-Fal-Object-Lifecycle-Preference"]
        == '{"expiration_duration_seconds": 3600}'
        for o in outcomes
    )

    # Nothing of these requests is left on fal; every record is deleted, with fal's answer.
    after = emulator.inventory(hashes=False)
    assert not request_ids & set(after["payloads"])
    assert _files_of(after, request_ids) == []
    assert sorted(report.deleted) == sorted(o.record.job_id for o in outcomes)
    assert report.kept == []
    assert all(r.state is JobState.DELETED and r.deletion is not None for r in report.records)
    # The input upload carries the policy's upload lifecycle (payload deletion never removes it).
    (upload,) = [f for f in after["files"] if f["url"] == image_url]
    lifetime = datetime.fromisoformat(upload["expires_at"]) - datetime.fromisoformat(
        upload["created_at"]
    )
    assert abs(lifetime.total_seconds() - (settings.retention.upload_ttl_seconds or 0)) < 5


@pytest.mark.parametrize("keep_failed_on_fal", [False, True])
def test_a_failed_request_is_archived_then_removed_from_fal_unless_kept(
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    keep_failed_on_fal: bool,
) -> None:
    """A flagged prompt is exactly what should not stay on fal: its input and fal's error go to
    the bucket, then fal's copy is deleted (``keep_failed_on_fal`` keeps it for debugging)."""
    settings = settings_for(file_bucket, retention={"keep_failed_on_fal": keep_failed_on_fal})
    run_key = f"model-error-{keep_failed_on_fal}"

    async def main() -> tuple[JobFailed, CleanupReport]:
        async with open_runtime(settings, run_key) as rt:
            (job,) = _jobs(settings, run_key, [("fal-ai/flux/dev", {"prompt": "a forbidden cat"})])
            with pytest.raises(JobFailed) as caught:
                await run_job(rt, job)
            # A re-run does not submit a failed request again: it raises the same failure.
            with pytest.raises(JobFailed):
                await run_job(rt, job)
            return caught.value, await cleanup(rt, [caught.value.record])

    failure, report = anyio.run(main)
    record = failure.record
    assert record.state is JobState.FAILED
    assert record.error_type == "content_policy_violation"
    assert "flagged by a content checker" in (record.error or "")
    assert "content_policy_violation" in str(failure)
    root = _root(file_bucket)
    assert record.input_key is not None
    assert json.loads((root / record.input_key).read_text()) == {"prompt": "a forbidden cat"}
    assert record.error_key is not None
    error = json.loads((root / record.error_key).read_text())
    assert error["result"]["status_code"] == 422
    assert error["status"]["error_type"] == "content_policy_violation"
    submitted = [r for r in emulator.requests() if r["request_id"] == record.request_id]
    assert len(submitted) == 1
    (after,) = report.records
    assert after.state is JobState.FAILED  # it stays failed; fal's copy is what goes
    if keep_failed_on_fal:
        assert [k.job_id for k in report.kept] == [record.job_id]
        assert submitted[0]["payloads_deleted"] is False
        assert record.request_id in emulator.inventory(hashes=False)["payloads"]
    else:
        assert report.deleted == [record.job_id]
        assert after.deletion is not None
        assert after.deletion.confirmed_at is not None
        assert submitted[0]["payloads_deleted"] is True
        assert record.request_id not in emulator.inventory(hashes=False)["payloads"]


def test_hostile_outputs_are_refused_with_clear_errors_and_never_deleted(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    settings = settings_for(file_bucket, limits={"max_file_bytes": 1000})
    run_key = "hostile"
    cdn = f"https://{emulator.host}/cdn/files"
    specs: list[tuple[str, dict[str, Any]]] = [
        ("emulator/echo", {"output": {"image": {"url": "https://evil.example/cat.png"}}}),
        ("emulator/echo", {"output": {"leak": "file:///etc/passwd"}}),
        ("emulator/echo", {"output": {"plain": f"http://{emulator.host}/cdn/files/x.png"}}),
        (
            "emulator/echo",
            {"output": {"f": {"url": f"{cdn}/x.png", "file_name": "../../etc/passwd"}}},
        ),
        ("emulator/echo", {"output": {}, "files": [{"file_name": "big.bin", "size": 5000}]}),
    ]
    expected = [
        "not a fal CDN host",
        "not an https URL",
        "not an https URL",
        "try to choose where they are stored",
        "above the 1000-byte cap",
    ]

    async def main() -> tuple[list[JobOutcome], CleanupReport]:
        async with open_runtime(settings, run_key) as rt:
            outcomes, failures = await run_jobs(rt, _jobs(settings, run_key, specs))
            assert failures == []
            return outcomes, await cleanup(rt, [o.record for o in outcomes])

    outcomes, report = anyio.run(main)
    for outcome, why in zip(outcomes, expected, strict=True):
        record = outcome.record
        assert record.state is JobState.COMPLETED, record
        assert record.error_type == "archive_refused"
        assert why in (record.error or "")
        assert not record.verified
    assert not any("passwd" in path.name for path in _root(file_bucket).rglob("*"))
    assert report.deleted == []
    assert {k.job_id for k in report.kept} == {o.record.job_id for o in outcomes}
    assert all(o.record.unverified for o in outcomes)  # what allow_unverified may let pass
    held = emulator.inventory(hashes=False)["payloads"]
    assert {o.record.request_id for o in outcomes} <= set(held)


def _root(bucket: BucketSettings) -> Path:
    return Path(bucket.url.removeprefix("file://"))


def test_truncated_downloads_are_retried_then_left_unverified(
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    faults: Callable[..., None],
) -> None:
    settings = settings_for(file_bucket)
    run_key = "truncated"
    (job,) = _jobs(
        settings, run_key, [("emulator/echo", {"output": {}, "files": [{"size": 300_000}]})]
    )

    async def attempt() -> JobOutcome:
        async with open_runtime(settings, run_key) as rt:
            return await run_job(rt, job)

    faults(truncated_download=1.0)
    first = anyio.run(attempt).record
    assert first.state is JobState.COMPLETED
    assert first.error_type == "archive_failed"
    assert "after 4 attempts" in (first.error or "")
    assert "truncated" in (first.error or "").lower() or "peer closed" in (first.error or "")

    # Some downloads truncated: the retries get a whole copy, with the right hash.
    faults(truncated_download=0.5, seed=3)
    second = anyio.run(attempt).record
    assert second.state is JobState.ARCHIVED
    assert second.request_id == first.request_id  # resumed, not submitted again
    (obj,) = second.objects
    (fal_file,) = [f for f in emulator.inventory()["files"] if f["request_id"] == second.request_id]
    assert obj.sha256 == fal_file["sha256"]


@pytest.mark.parametrize("bucket_kind", ["file", "azurite"])
def test_resume_submits_nothing_twice_and_uploads_nothing_twice(
    bucket_kind: str,
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    request: pytest.FixtureRequest,
) -> None:
    bucket = request.getfixturevalue(BUCKETS[bucket_kind])
    settings = settings_for(bucket)
    run_key = f"resume-{bucket_kind}"
    jobs = _jobs(
        settings,
        run_key,
        [("emulator/echo", {"output": {"n": n}, "files": [{"size": 2048}]}) for n in range(5)],
    )
    sent_before = _echo_requests(emulator)

    async def first_run() -> None:
        async with open_runtime(settings, run_key) as rt:
            await run_jobs(rt, jobs[:2])  # archived
            # a crash right after the submit: the request id is recorded, nothing else
            record = JobRecord(
                job_id=jobs[2].job_id,
                run_key=run_key,
                endpoint=jobs[2].endpoint,
                policy=jobs[2].policy,
            )
            await submit(rt, jobs[2], record)

    async def archived_files() -> dict[str, str | None]:
        """Each archived file and its store-given version tag (a rewrite changes it)."""
        store = open_bucket(bucket).store
        found = {}
        async for chunk in obstore.list(store, f"runs/{run_key}"):
            for meta in chunk:
                if "/files/" in meta["path"]:
                    found[meta["path"]] = meta["e_tag"]
        return found

    anyio.run(first_run)
    before = anyio.run(archived_files)
    assert len(before) == 2
    assert all(before.values())

    async def second_run() -> tuple[list[JobOutcome], list[JobFailed]]:
        async with open_runtime(settings, run_key) as rt:
            return await run_jobs(rt, jobs)

    time.sleep(0.01)
    outcomes, failures = anyio.run(second_run)
    assert failures == []
    assert all(o.record.state is JobState.ARCHIVED for o in outcomes)
    after = anyio.run(archived_files)
    assert len(after) == 5
    assert {key: after[key] for key in before} == before  # not uploaded again
    assert _echo_requests(emulator) - sent_before == 5  # one submit per job, over both runs
    assert len({o.record.request_id for o in outcomes}) == 5


def test_lost_submit_answer_is_found_in_the_listing_not_resent(
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    faults: Callable[..., None],
) -> None:
    settings = settings_for(file_bucket)
    run_key = "lost-answer"
    (job,) = _jobs(settings, run_key, [("emulator/echo", {"output": {"lost": run_key}})])

    async def main() -> JobOutcome:
        async with open_runtime(settings, run_key) as rt:
            return await run_job(rt, job)

    sent_before = _echo_requests(emulator)
    faults(lost_submit_answer=1.0)
    outcome = anyio.run(main)
    record = outcome.record
    assert record.state is JobState.ARCHIVED
    assert JobState.SUBMIT_UNKNOWN in [state for state, _ in record.history]
    assert _echo_requests(emulator) - sent_before == 1  # the lost answer was not re-sent


def test_cancelling_the_caller_cancels_the_fal_request(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    settings = settings_for(file_bucket)
    run_key = "cancel"
    (job,) = _jobs(settings, run_key, [("emulator/echo", {"output": {}, "latency_seconds": 30})])

    record = anyio.run(_cancelled_mid_wait, settings, run_key, job)
    assert record.state is JobState.SUBMITTED  # a re-run learns whether it finished anyway
    assert record.error_type == "cancelled"
    (described,) = [r for r in emulator.requests() if r["request_id"] == record.request_id]
    assert described["status"] == "COMPLETED"
    assert described["status_code"] == 499


@pytest.mark.parametrize("resubmit", [True, False], ids=["resumed-run", "janitor"])
def test_a_request_falflow_had_cancelled_is_deleted_and_submitted_again_on_resume(
    emulator: RunningEmulator,
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    resubmit: bool,
) -> None:
    """fal failing a request as cancelled because falflow asked it to is no failure of the job:
    the run's resume deletes that request from fal and submits the job again; the janitor
    (``resubmit_cancelled=False``) only deletes it, and the next resume submits it."""
    settings = settings_for(file_bucket)
    run_key = f"cancel-resume-{resubmit}"
    slow = {"output": {"k": run_key}, "latency_seconds": 30}
    (job,) = _jobs(settings, run_key, [("emulator/echo", slow)])

    first = anyio.run(_cancelled_mid_wait, settings, run_key, job)
    assert first.cancel_requested_at is not None
    quick = Job(**{**job.model_dump(), "arguments": {"output": {"k": run_key}}})

    async def resume(**options: bool) -> JobOutcome:
        async with open_runtime(settings, run_key) as rt:
            return await run_job(rt, quick, **options)

    if not resubmit:
        with pytest.raises(JobFailed) as failed:
            anyio.run(lambda: resume(resubmit_cancelled=False))
        assert failed.value.record.error_type == "client_cancelled"
        anyio.run(lambda: _cleanup(settings, run_key, [failed.value.record]))
    outcome = anyio.run(resume)
    assert outcome.record.state is JobState.ARCHIVED
    assert outcome.record.request_id != first.request_id
    assert outcome.record.cancel_requested_at is None
    assert emulator.inventory()["payloads"].get(first.request_id) is None  # deleted, not left


async def _cancelled_mid_wait(settings: Settings, run_key: str, job: Job) -> JobRecord:
    """``job``'s record after its run was cancelled a second into waiting for fal."""
    async with open_runtime(settings, run_key) as rt:
        with anyio.move_on_after(1.0):
            await run_job(rt, job)
        record = await rt.ledger.get(run_key, job.job_id)
    assert record is not None
    return record


async def _cleanup(settings: Settings, run_key: str, records: list[JobRecord]) -> CleanupReport:
    async with open_runtime(settings, run_key) as rt:
        return await cleanup(rt, records)


def test_crash_between_attempt_and_answer_is_reconciled_never_resent(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    """A record whose submit was attempted but whose request id never reached the ledger (a
    kill -9 mid-POST): the re-run adopts fal's request if the listing shows it, else stops."""
    settings = settings_for(file_bucket)
    run_key = "crash-mid-submit"
    reached, lost = _jobs(
        settings,
        run_key,
        [
            ("emulator/echo", {"output": {"k": "reached"}}),
            ("emulator/echo", {"output": {"k": "lost"}}),
        ],
    )

    async def crash() -> None:
        async with open_runtime(settings, run_key) as rt:
            for job in (reached, lost):
                blank = JobRecord(
                    job_id=job.job_id, run_key=run_key, endpoint=job.endpoint, policy=job.policy
                )
                record, _ = await submit(rt, job, blank)
                attempted = record.submit_attempted_at
                # what the ledger held at the crash: the attempt, no request id
                await rt.ledger.put(blank.model_copy(update={"submit_attempted_at": attempted}))

    anyio.run(crash)
    # For the second job, make fal "never have seen it": the listing matches inputs, so give the
    # re-run a job whose input fal has no request for.
    lost_again = lost.model_copy(update={"arguments": {"output": {"k": "never sent"}}})
    sent_before = _echo_requests(emulator)

    async def rerun() -> tuple[JobOutcome, JobFailed]:
        async with open_runtime(settings, run_key) as rt:
            outcome = await run_job(rt, reached)
            with pytest.raises(JobFailed) as caught:
                await run_job(rt, lost_again)
            return outcome, caught.value

    outcome, failure = anyio.run(rerun)
    assert outcome.record.state is JobState.ARCHIVED
    assert failure.record.state is JobState.SUBMIT_UNKNOWN
    assert failure.record.error_type == "submit_outcome_unknown"
    assert "never re-sends" in (failure.record.error or "")
    assert f"ledger/{run_key}/{lost.job_id}.json" in (failure.record.error or "")
    assert _echo_requests(emulator) == sent_before  # nothing was submitted by the re-run


def test_a_lost_submit_past_its_start_deadline_and_not_listed_is_submitted_again_once(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    """The process died before fal queued its request: once the start deadline (plus the
    listing's lag) has passed, fal's listing proves it never ran, so it is sent again, once."""
    settings = settings_for(file_bucket, retention={"start_timeout_seconds": 2})
    run_key = "never-reached-fal"
    (job,) = _jobs(settings, run_key, [("emulator/echo", {"output": {"k": "never queued"}})])
    attempted = utcnow() - timedelta(seconds=2) - LISTING_LAG - timedelta(seconds=1)

    async def main() -> JobOutcome:
        async with open_runtime(settings, run_key) as rt:
            blank = JobRecord(
                job_id=job.job_id, run_key=run_key, endpoint=job.endpoint, policy=job.policy
            )  # what the ledger held at the kill: the attempt, no request id, nothing on fal
            await rt.ledger.put(blank.model_copy(update={"submit_attempted_at": attempted}))
            return await run_job(rt, job)

    sent_before = _echo_requests(emulator)
    outcome = anyio.run(main)
    assert outcome.record.state is JobState.ARCHIVED
    assert JobState.NEVER_SUBMITTED in [state for state, _ in outcome.record.history]
    assert _echo_requests(emulator) == sent_before + 1


def test_cleanup_paces_deletes_and_slows_down_on_429s_without_retry_after(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    """fal's spec declares no rate-limit header: the emulator's 429s carry none, and the
    shared pacer still backs off (and every deletion is confirmed, none failed)."""
    assert emulator.current_config().platform_retry_after is False
    settings = settings_for(file_bucket, limits={"delete_rate_per_second": 12.0, "deletes": 4})
    run_key = "paced-cleanup"
    jobs = _jobs(settings, run_key, [("emulator/echo", {"output": {"n": n}}) for n in range(6)])

    async def main() -> tuple[CleanupReport, float, float]:
        async with open_runtime(settings, run_key) as rt:
            outcomes, _ = await run_jobs(rt, jobs)
            emulator.configure(platform_rate_per_second=8.0, platform_burst=1)
            try:
                started = time.monotonic()
                report = await cleanup(rt, [o.record for o in outcomes])
                return report, time.monotonic() - started, rt.platform.pacer.interval
            finally:
                emulator.configure(platform_rate_per_second=None, platform_burst=None)

    report, elapsed, interval = anyio.run(main)
    assert len(report.deleted) == 6
    assert report.delete_failed == []
    assert elapsed >= 0.6  # six deletes at eight a second at most: 429s waited out, not failed
    assert interval > 1 / 12.0  # the pace slowed down after the 429s


def test_pacer_spaces_calls_and_pauses_for_everyone() -> None:
    async def main() -> tuple[float, float]:
        pacer = Pacer(20.0)
        started = time.monotonic()
        for _ in range(5):
            await pacer.wait()
        spaced = time.monotonic() - started
        pacer.pause(0.3)
        started = time.monotonic()
        await pacer.wait()
        return spaced, time.monotonic() - started

    spaced, paused = anyio.run(main)
    assert 0.19 <= spaced < 0.5
    assert paused >= 0.29


def test_a_tiny_memory_budget_serialises_downloads_and_still_verifies_every_byte(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    # 1 MiB for all downloads together, files of 3 MB each: every file needs more than the whole
    # budget, so they take turns; each is hashed chunk by chunk in worker threads on the way.
    settings = settings_for(file_bucket, limits={"archive_buffer_bytes": 1024**2})
    files = [{"size": 3_000_000 + i, "file_name": f"part-{i}.bin"} for i in range(4)]
    run_key = "tiny-budget"

    async def main() -> tuple[list[JobOutcome], list[JobFailed]]:
        async with open_runtime(settings, run_key) as rt:
            jobs = _jobs(settings, run_key, [("emulator/echo", {"output": {}, "files": files})] * 2)
            outcomes, failures = await run_jobs(rt, jobs)
            assert rt.buffers.available == rt.buffers.total  # every reservation given back
            return outcomes, failures

    outcomes, failures = anyio.run(main)
    assert failures == []
    request_ids = {o.record.request_id for o in outcomes if o.record.request_id}
    held = {f["url"]: f for f in _files_of(emulator.inventory(), request_ids)}
    archived = [obj for o in outcomes for obj in o.record.objects]
    assert len(archived) == len(held) == 8
    for obj in archived:
        assert (obj.sha256, obj.size) == (
            held[obj.source_url]["sha256"],
            held[obj.source_url]["size"],
        )
    assert all(o.record.verified for o in outcomes)


def test_a_file_whose_stated_size_is_not_what_the_cdn_serves_is_not_verified(
    emulator: RunningEmulator, settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    """An output saying ``file_size: 5000`` for a file the CDN serves whole at 100 bytes is not
    a verified archive: it is kept on fal, never deleted."""
    settings = settings_for(file_bucket)
    run_key = "stated-size"

    async def main() -> tuple[JobOutcome, CleanupReport]:
        async with open_runtime(settings, run_key) as rt:
            url = await upload_input(rt, b"x" * 100, content_type="text/plain", file_name="a.txt")
            output = {"output": {"f": {"url": url, "file_name": "a.txt", "file_size": 5000}}}
            (job,) = _jobs(settings, run_key, [("emulator/echo", output)])
            outcome = await run_job(rt, job)
            return outcome, await cleanup(rt, [outcome.record])

    outcome, report = anyio.run(main)
    record = outcome.record
    assert record.state is JobState.COMPLETED
    assert record.error_type == "archive_failed"
    assert "served 100 bytes but fal's output states file_size 5000" in (record.error or "")
    assert report.deleted == []
    assert record.request_id in emulator.inventory(hashes=False)["payloads"]


def test_a_memory_bucket_cannot_hold_the_only_copy_of_a_run(
    settings_for: SettingsFor,
) -> None:
    settings = settings_for(BucketSettings(url="memory://gone-with-the-process"))

    async def main() -> None:
        async with open_runtime(settings, "in-memory"):
            raise AssertionError("a run must not start on a memory:// bucket")

    with pytest.raises(SettingsError, match="FALFLOW_BUCKET__URL: a memory:// bucket dies"):
        anyio.run(main)
