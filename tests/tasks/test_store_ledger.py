"""The bucket and the ledger on every bucket kind that runs here: memory, a directory, S3 on moto
and SeaweedFS, Azure on Azurite, and what fake-gcs-server answers of GCS."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from bench.servers import GCSServer
from falflow.settings import BucketSettings, RetentionPolicy, SettingsError
from falflow.tasks.ledger import Ledger, check_segment, parent_run_key, run_prefix, shard_run_key
from falflow.tasks.models import ArchivedObject, JobRecord, JobState
from falflow.tasks.store import open_bucket, settle
from tests.support.fixtures import BUCKETS


def _record(job_id: str, run_key: str = "run-1") -> JobRecord:
    return JobRecord(
        job_id=job_id, run_key=run_key, endpoint="fal-ai/flux/schnell", policy=RetentionPolicy()
    )


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for i in range(count):
        yield bytes([i % 256]) * size


def _roundtrip(bucket_settings: BucketSettings) -> None:
    async def main() -> None:
        bucket = open_bucket(bucket_settings)
        ledger = Ledger(bucket)
        assert await ledger.get("run-1", "job-a") is None
        record = _record("job-a").moved_to(JobState.SUBMITTED, request_id="req-1")
        await ledger.put(record)
        await ledger.put(_record("job-b"))
        await ledger.put(_record("job-c", run_key="run-2"))
        assert await ledger.get("run-1", "job-a") == record
        assert {r.job_id async for r in ledger.list("run-1")} == {"job-a", "job-b"}
        assert {(r.run_key, r.job_id) async for r in ledger.list()} == {
            ("run-1", "job-a"),
            ("run-1", "job-b"),
            ("run-2", "job-c"),
        }
        # a streamed object larger than one multipart part, then its size and content
        await bucket.put_stream("runs/run-1/job-a/files/000-big.bin", _chunks(10, 1024 * 1024))
        assert await bucket.size("runs/run-1/job-a/files/000-big.bin") == 10 * 1024 * 1024
        assert await bucket.size("runs/run-1/job-a/files/missing") is None
        data = await bucket.get_bytes("runs/run-1/job-a/files/000-big.bin")
        assert data is not None
        assert data[:1] == b"\x00"
        assert data[-1:] == b"\x09"
        await settle()

    anyio.run(main)


def test_memory_bucket_roundtrip_and_reopen() -> None:
    settings = BucketSettings(url="memory://roundtrip")
    _roundtrip(settings)

    async def reopened() -> None:
        assert await Ledger(open_bucket(settings)).get("run-1", "job-a") is not None

    anyio.run(reopened)


def test_file_bucket_roundtrip(file_bucket: BucketSettings, tmp_path: Path) -> None:
    _roundtrip(file_bucket)
    ledger_file = tmp_path / "archive" / "ledger" / "run-1" / "job-a.json"
    assert '"request_id": "req-1"' in ledger_file.read_text()  # readable by a person


def test_relative_file_bucket_is_resolved_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = open_bucket(BucketSettings(url="file://./nested/archive"))
    assert bucket.url == (tmp_path / "nested" / "archive").as_uri()
    assert (tmp_path / "nested" / "archive").is_dir()
    assert bucket.location("runs/a") == f"{bucket.url}/runs/a"


@pytest.mark.parametrize("bucket_kind", [k for k in BUCKETS if k != "file"])
def test_object_store_roundtrip(bucket_kind: str, request: pytest.FixtureRequest) -> None:
    _roundtrip(request.getfixturevalue(BUCKETS[bucket_kind]))


def test_gcs_reads_the_ledger_and_lists_on_fake_gcs_server(
    gcs_server: GCSServer, gcs_bucket: BucketSettings
) -> None:
    """fake-gcs-server answers none of obstore's uploads (docs/platform-notes.md): the objects
    are written through its JSON API, then read, listed and sized through falflow's bucket."""
    prefix = gcs_bucket.url.removeprefix(f"gs://{gcs_server.bucket}/")
    records = [_record("job-a"), _record("job-b"), _record("job-c", run_key="run-2")]
    for record in records:
        data = record.model_dump_json(indent=2).encode()
        gcs_server.upload(f"{prefix}/{Ledger.key(record.run_key, record.job_id)}", data)
    gcs_server.upload(f"{prefix}/runs/run-1/job-a/files/000-a.bin", b"\x00" * 1000)

    async def main() -> None:
        bucket = open_bucket(gcs_bucket)
        ledger = Ledger(bucket)
        assert await ledger.get("run-1", "job-a") == records[0]
        assert await ledger.get("run-1", "missing") is None
        assert {r.job_id async for r in ledger.list("run-1")} == {"job-a", "job-b"}
        assert len([r async for r in ledger.list()]) == 3
        assert await bucket.size("runs/run-1/job-a/files/000-a.bin") == 1000
        assert await bucket.size("runs/run-1/job-a/files/missing") is None
        assert [k async for k in bucket.keys("runs")] == ["runs/run-1/job-a/files/000-a.bin"]
        await settle()

    anyio.run(main)


def test_a_store_refusing_checksums_names_the_setting(
    checksum_refusing_s3: str, s3_bucket: BucketSettings
) -> None:
    """An S3-compatible store without S3's additional checksums (here: a proxy refusing any
    request that carries one, in front of moto): a clear error naming the setting; with the
    setting off, the same uploads go through."""
    refusing = s3_bucket.model_copy(update={"endpoint": checksum_refusing_s3})
    data = bytes(range(256)) * 30_000  # 7.3 MiB: a multipart upload

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1024 * 1024):
            yield data[start : start + 1024 * 1024]

    async def upload(settings: BucketSettings, streamed: bool) -> None:
        bucket = open_bucket(settings)
        if streamed:
            await bucket.put_stream("runs/r/j/files/000-big.bin", chunks())
        else:
            await Ledger(bucket).put(_record("job-a"))
        await settle()

    for streamed in (False, True):
        with pytest.raises(SettingsError, match="FALFLOW_BUCKET__STORE_CHECKSUMS") as caught:
            anyio.run(upload, refusing, streamed)
        assert "moto-secret-access-key" not in str(caught.value)
        anyio.run(upload, refusing.model_copy(update={"store_checksums": False}), streamed)

    assert anyio.run(open_bucket(s3_bucket).get_bytes, "runs/r/j/files/000-big.bin") == data


@pytest.mark.parametrize("bad", ["a/b", "..", "../x", "", ".hidden", "a b", "x" * 121])
def test_run_keys_and_job_ids_are_refused_not_rewritten(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be used in bucket keys"):
        check_segment(bad, "run key")
    with pytest.raises(ValueError, match="run key"):
        Ledger.key(bad, "job")
    with pytest.raises(ValueError, match="job id"):
        run_prefix("run", bad)


def test_ledger_record_holds_what_a_person_needs() -> None:
    record = _record("job-a").moved_to(
        JobState.ARCHIVED,
        request_id="req-1",
        objects=[
            ArchivedObject(
                source_url="https://v3.fal.media/files/x.png",
                key="runs/run-1/job-a/files/000-x.png",
                size=3,
                sha256=hashlib.sha256(b"abc").hexdigest(),
            )
        ],
    )
    again = JobRecord.model_validate_json(record.model_dump_json())
    assert again.verified
    assert again.archived_bytes == 3
    assert [state for state, _ in again.history] == [JobState.ARCHIVED]
    assert os.sep not in Ledger.key("run-1", "job-a").replace("/", "")


def test_a_shard_run_key_is_one_segment_that_names_its_parent() -> None:
    assert shard_run_key("nightly-2025-01-31", 3) == "nightly-2025-01-31.shard-3"
    assert parent_run_key("nightly-2025-01-31.shard-3") == "nightly-2025-01-31"
    assert parent_run_key("a.shard-1.shard-12") == "a.shard-1"
    for other in ("nightly", "x.shard-", ".shard-1", "x.shard-1a"):
        assert parent_run_key(other) is None
    with pytest.raises(ValueError, match="shard run key"):
        shard_run_key("k" * 115, 0)
