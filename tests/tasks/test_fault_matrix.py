"""The fault matrix: a batch of jobs through the real pipeline with every fault on at once.

429s, ingress 503s, connection resets, truncated downloads, slow answers, model errors and lost
submit answers strike the submits, status calls, results, CDN downloads and Platform API calls of
one run: ``run_jobs`` on two batches (the second while fal's CDN truncates every download, so
some archives cannot be verified), then the cleanup task's function, as the flow runs them.
Between the two, with the faults paused, the emulator and the ledger are snapshotted: nothing may
be deleted yet, and every request cleanup then deletes must have been ``archived`` in that
snapshot, with every object in the bucket verified against fal's own file. A re-run with the same
run key after the faults are cleared must finish what is left, without a single new submit.

The faults are seeded, so a given order of calls meets the same faults; the order of concurrent
calls still varies, so the assertions are invariants that hold for any of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from falflow.emulator import Faults, RunningEmulator
from falflow.settings import BucketSettings, Settings
from falflow.tasks.cleanup import CleanupReport, cleanup_task, gone_from_fal
from falflow.tasks.jobs import JobFailed, run_job
from falflow.tasks.models import Job, JobRecord, JobState
from falflow.tasks.runtime import Runtime, open_runtime
from tests.support.jobs import run_jobs

FLUX = "fal-ai/flux/schnell"
ECHO = "emulator/echo"
VIDEO = "fal-ai/kling-video/v2.1/standard/image-to-video"
ENDPOINTS = (FLUX, ECHO, VIDEO)
VIDEO_BYTES = 96 * 1024
MATRIX = Faults(
    rate_limit_429=0.10,
    ingress_503=0.06,
    connection_reset=0.04,
    truncated_download=0.20,
    slow_answer=0.05,
    slow_seconds=0.3,
    model_error=0.10,
    lost_submit_answer=0.04,
    seed=20250131,
)
CDN_DOWN = MATRIX.model_copy(update={"truncated_download": 1.0, "seed": MATRIX.seed + 1})
"""The matrix while every CDN download is truncated: those archives cannot be verified."""
AT_CLEANUP = MATRIX.model_copy(update={"seed": MATRIX.seed + 2})
NO_FAULTS = Faults()
BLOCKED = "forbidden"
"""The emulator's blocked word: a prompt with it always fails with content_policy_violation."""
RUNNER_ERROR = {"detail": "Internal Server Error", "error_type": "runner_server_error"}
MODEL_ERRORS = {
    500: ("runner_server_error", "Internal Server Error"),
    422: ("content_policy_violation", "flagged by a content checker"),
}
"""fal's status code for a failed run → the error type and message the ledger must carry."""


def _png_data_url() -> str:
    """A tiny PNG as a data: URL (the video model reads its input image from it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\x20\x40\x60" * 4 for _ in range(4))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _arguments() -> list[tuple[str, dict[str, Any]]]:
    """40 jobs, every input unique (submits are counted per input); four always fail on fal
    (two blocked prompts, two runner errors), others fail when the model_error fault strikes."""
    image = _png_data_url()
    specs: list[tuple[str, dict[str, Any]]] = []
    for n in range(16):
        prompt = f"a {BLOCKED} kite {n}" if n in (5, 11) else f"matrix kite {n}"
        specs.append((FLUX, {"prompt": prompt, "num_images": 1 + n % 2, "image_size": "square"}))
    for n in range(16):
        files = [{"size": 20_000 + 1_000 * n}] + ([{"size": 4_096 + n}] if n % 3 == 0 else [])
        arguments: dict[str, Any] = {"output": {"matrix": n}, "files": files}
        if n in (4, 9):
            arguments["fail"] = {"status": 500, "body": RUNNER_ERROR}
        specs.append((ECHO, arguments))
    for n in range(8):
        specs.append((VIDEO, {"prompt": f"matrix push-in {n}", "image_url": image}))
    return specs


def _key(arguments: Any) -> str:
    return json.dumps(arguments, sort_keys=True)


@dataclass
class Snapshot:
    """The emulator and the ledger between ``run_jobs`` and cleanup, faults paused."""

    records: dict[str, JobRecord]
    """Job id → its ledger record."""
    requests: dict[str, dict[str, Any]]
    """Request id → the emulator's description, for requests made by this test."""
    inputs: dict[str, str]
    """Request id → its input (``_key``), from the Platform API listing (which shows it until
    the payloads are deleted, so earlier snapshots fill in the deleted ones)."""
    files: dict[str, dict[str, Any]]
    """fal CDN URL → the emulator's file (size, sha256, request_id)."""


@dataclass
class Phase:
    before_cleanup: Snapshot
    report: CleanupReport
    after: dict[str, JobRecord]
    """Job id → its ledger record after cleanup."""
    requests_after: dict[str, dict[str, Any]]
    """The emulator's description of this test's requests after cleanup."""
    injected: Counter[str]
    seconds: float


@pytest.fixture
def small_videos(emulator: RunningEmulator) -> Iterator[None]:
    original = emulator.current_config().video_size_bytes
    emulator.configure(video_size_bytes=VIDEO_BYTES)
    try:
        yield
    finally:
        emulator.configure(video_size_bytes=original)


@pytest.mark.usefixtures("small_videos")
def test_every_recoverable_job_is_archived_and_nothing_is_deleted_before_it(
    emulator: RunningEmulator,
    settings_for: Callable[..., Settings],
    file_bucket: BucketSettings,
    faults: Callable[..., None],
) -> None:
    settings = settings_for(file_bucket, retention={"media_ttl_seconds": 3600})
    run_key = "fault-matrix"
    jobs = [
        Job(
            job_id=Job.make_id(run_key, "matrix", n),
            endpoint=endpoint,
            arguments=arguments,
            policy=settings.retention.policy_for(endpoint),
        )
        for n, (endpoint, arguments) in enumerate(_arguments())
    ]
    by_input = {_key(job.arguments): job.job_id for job in jobs}
    assert len(by_input) == len(jobs)
    earlier = {r["request_id"] for r in emulator.requests()}

    def ours(requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in requests if r["request_id"] not in earlier}

    inputs: dict[str, str] = {}

    async def snapshot(rt: Runtime) -> Snapshot:
        async for item in rt.platform.list_requests(ENDPOINTS, expand_payloads=True):
            if item["request_id"] not in earlier and item["json_input"] is not None:
                inputs[item["request_id"]] = _key(item["json_input"])
        return Snapshot(
            records=await _ledger(rt, jobs),
            requests=ours(emulator.requests()),
            inputs=dict(inputs),
            files={f["url"]: f for f in emulator.inventory()["files"]},
        )

    async def phase(batches: list[tuple[Faults, list[Job]]], at_cleanup: Faults) -> Phase:
        started = time.monotonic()
        injected: Counter[str] = Counter()

        def under(matrix: Faults) -> None:
            faults(**matrix.model_dump())

        def pause() -> None:
            injected.update(emulator.injected_faults())
            faults()

        async with open_runtime(settings, run_key) as rt:
            for matrix, batch in batches:  # one after the other, as the flow's batch tasks run
                under(matrix)
                await run_jobs(rt, batch)  # failed jobs are read back from the ledger
                pause()
            before = await snapshot(rt)
            under(at_cleanup)
            report = await cleanup_task.fn([job.job_id for job in jobs])
            pause()
            after = await _ledger(rt, jobs)
        seconds = time.monotonic() - started
        return Phase(before, report, after, ours(emulator.requests()), injected, seconds)

    first, second = jobs[0::2], jobs[1::2]
    faulty = anyio.run(phase, [(MATRIX, first), (CDN_DOWN, second)], AT_CLEANUP)
    # Every kind of fault struck (the seed makes it likely; the counts make it certain).
    kinds = ("rate_limit_429", "ingress_503", "connection_reset", "truncated_download")
    for kind in (*kinds, "slow_answer"):
        assert faulty.injected[kind] > 0, faulty.injected
    submits, deleted = _check_phase(faulty, jobs, by_input, file_bucket, set())

    states = {j: r.state for j, r in faulty.after.items()}
    failed = {j for j, s in states.items() if s is JobState.FAILED}
    unknown = {j for j, s in states.items() if s is JobState.SUBMIT_UNKNOWN}
    always_fail = {jobs[n].job_id for n in (5, 11, 20, 25)}
    assert always_fail <= failed | unknown  # (unknown if their submit's answer was lost)
    assert len(always_fail & failed) >= 2
    # The outage left archives unverified: kept on fal, payloads and files, for the re-run.
    unverified = {j for j, s in states.items() if s is JobState.COMPLETED}
    assert len(unverified) >= 5, Counter(states.values())
    still_on_fal = emulator.inventory(hashes=False)
    with_files = {f["request_id"] for f in still_on_fal["files"]}
    for job_id in unverified:
        record = faulty.after[job_id]
        assert record.error_type == "archive_failed", record
        assert record.request_id in set(still_on_fal["payloads"]) & with_files, record
    recoverable = [j.job_id for j in jobs if j.job_id not in failed | unknown]
    assert len(recoverable) >= 20, Counter(states.values())

    # The re-run, faults cleared: everything recoverable left over is finished, nothing re-sent.
    rerun = anyio.run(phase, [(NO_FAULTS, jobs)], NO_FAULTS)
    assert ours(emulator.requests()).keys() == faulty.requests_after.keys()
    assert _check_phase(rerun, jobs, by_input, file_bucket, deleted)[0] == submits
    for job_id in recoverable:
        assert rerun.after[job_id].state is JobState.DELETED, rerun.after[job_id]
    for job_id in failed | unknown:
        assert rerun.after[job_id].state is states[job_id], rerun.after[job_id]
    assert rerun.report.delete_failed == []
    # fal's failures left fal with their input and error archived; lost submits stay unknown
    assert {j for j in failed if gone_from_fal(rerun.after[j])} == failed
    assert {k.job_id for k in rerun.report.kept} == unknown
    print(
        f"fault matrix: {dict(faulty.injected)}; after the faulty run "
        f"{dict(Counter(s.value for s in states.values()))}; faulty run {faulty.seconds:.1f} s, "
        f"re-run {rerun.seconds:.1f} s"
    )


async def _ledger(rt: Runtime, jobs: list[Job]) -> dict[str, JobRecord]:
    records = {}
    for job in jobs:
        record = await rt.ledger.get(rt.run_key, job.job_id)
        assert record is not None, f"{job.job_id} has no ledger record"
        records[job.job_id] = record
    return records


def _check_phase(
    phase: Phase,
    jobs: list[Job],
    by_input: dict[str, str],
    bucket: BucketSettings,
    deleted_earlier: set[str],
) -> tuple[dict[str, str], set[str]]:
    """Every invariant of one run; returns job id → its one request on fal, and every request
    whose payloads are deleted so far."""
    before = phase.before_cleanup
    assert {r.job_id for r in phase.report.records} == {j.job_id for j in jobs}

    # One submit per job at most: every request this test made has an input that is exactly one
    # job's, and no job's input was submitted twice.
    assert before.inputs.keys() == before.requests.keys()  # the listing saw every request
    per_job = Counter(by_input[text] for text in before.inputs.values())
    assert max(per_job.values()) == 1, per_job.most_common(3)
    submitted = {by_input[text]: request_id for request_id, text in before.inputs.items()}
    request_to_job = {r: j for j, r in submitted.items()}
    for job_id, record in phase.after.items():
        assert record.request_id == submitted.get(job_id), record
        if record.state is JobState.SUBMIT_UNKNOWN:
            # honest: fal has no request with its input (the submit never reached the queue)
            assert job_id not in submitted, record
            assert record.error_type == "submit_outcome_unknown"

    # Zero deletions before a verified archive. While the jobs ran nothing was deleted (only
    # cleanup deletes); everything cleanup deleted was archived in the ledger before it started,
    # with fal's exact bytes in the bucket.
    deleted_before = {r for r, d in before.requests.items() if d["payloads_deleted"]}
    assert deleted_before == deleted_earlier
    deleted = {r for r, d in phase.requests_after.items() if d["payloads_deleted"]}
    for request_id in deleted - deleted_earlier:
        job_id = request_to_job[request_id]
        earlier, record = before.records[job_id], phase.after[job_id]
        if record.state is JobState.FAILED:  # deleted only once its input and error are archived
            assert earlier.state is JobState.FAILED, earlier
            assert earlier.input_key is not None
            assert earlier.error_key is not None
            assert (Path(bucket.url.removeprefix("file://")) / earlier.error_key).is_file()
            assert record.deletion is not None
            assert record.deletion.confirmed_at is not None
            continue
        assert earlier.state is JobState.ARCHIVED, earlier
        assert record.state is JobState.DELETED, record
        assert record.archived_at is not None
        assert record.deleted_at is not None
        assert earlier.archived_at == record.archived_at < record.deleted_at
        history = [state for state, _ in record.history]
        assert history.index(JobState.ARCHIVED) < history.index(JobState.DELETED), history
        _check_objects(record, before.requests[request_id], before.files, bucket)
    # ...and the ledger claims no deletion fal did not make.
    claimed = {r.request_id for r in phase.after.values() if gone_from_fal(r)}
    assert claimed == deleted

    # Failed runs carry fal's error type, and leave fal once their error is archived.
    for request_id, described in phase.requests_after.items():
        record = phase.after[request_to_job[request_id]]
        code = described["status_code"]
        if code is not None and code >= 400:
            error_type, message = MODEL_ERRORS[code]
            assert record.state is JobState.FAILED, record
            assert record.error_type == error_type, record
            assert message in (record.error or ""), record  # fal's own message, not a proxy's
            assert (request_id in deleted) == gone_from_fal(record)
        elif record.state is JobState.FAILED:
            raise AssertionError(f"fal completed {request_id} but the ledger says {record}")
    for record in phase.after.values():
        if record.state is JobState.FAILED:
            assert record.request_id is not None, record  # no submit was refused for good
    return submitted, deleted


def _check_objects(
    record: JobRecord,
    described: dict[str, Any],
    fal_files: dict[str, dict[str, Any]],
    bucket: BucketSettings,
) -> None:
    """Every output file of the request is in the bucket with fal's size and sha256."""
    assert described["output_files"], described
    assert {o.source_url for o in record.objects} == set(described["output_files"]), record
    root = Path(bucket.url.removeprefix("file://"))
    for obj in record.objects:
        fal_file = fal_files[obj.source_url]
        assert (obj.size, obj.sha256) == (fal_file["size"], fal_file["sha256"]), obj
        data = (root / obj.key).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (obj.size, obj.sha256), obj.key


def test_a_runner_error_is_fals_answer_at_once_not_retried(
    emulator: RunningEmulator, settings_for: Callable[..., Settings], file_bucket: BucketSettings
) -> None:
    """The result call of a failed request answers with its error (a 500 with
    ``x-fal-request-id``) every time: it is recorded at once, not retried for half a minute."""
    settings = settings_for(file_bucket)
    run_key = "runner-error"
    job = Job(
        job_id=Job.make_id(run_key, "echo"),
        endpoint=ECHO,
        arguments={"output": {}, "fail": {"status": 500, "body": RUNNER_ERROR}},
        policy=settings.retention.policy_for(ECHO),
    )

    async def main() -> JobFailed:
        async with open_runtime(settings, run_key) as rt:
            with pytest.raises(JobFailed) as caught:
                await run_job(rt, job)
            return caught.value

    started = time.monotonic()
    record = anyio.run(main).record
    assert time.monotonic() - started < 5  # eight tries with backoff took 16-32 s
    assert record.state is JobState.FAILED
    assert record.error_type == "runner_server_error"
    assert "Internal Server Error" in (record.error or "")
