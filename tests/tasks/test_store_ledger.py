"""The bucket and the ledger on every bucket kind that runs here: memory, a directory, moto S3."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from obstore.store import AzureStore, GCSStore
from pydantic import SecretStr

from falflow.settings import BucketSettings, RetentionPolicy
from falflow.tasks.ledger import Ledger, check_segment, run_prefix
from falflow.tasks.models import ArchivedObject, JobRecord, JobState
from falflow.tasks.store import open_bucket, settle


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


def test_s3_bucket_roundtrip(s3_bucket: BucketSettings) -> None:
    _roundtrip(s3_bucket)


def test_gcs_and_azure_buckets_are_built_from_settings() -> None:
    # No emulator of their APIs runs here: construction only (see the pipeline report).
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "client_email": "falflow@example.iam.gserviceaccount.com",
        "private_key_id": "k1",
        "private_key": pem,
    }
    gcs = open_bucket(
        BucketSettings(
            url="gs://media-archive/falflow", gcs_service_account_key=SecretStr(json.dumps(account))
        )
    )
    assert isinstance(gcs.store, GCSStore)
    assert gcs.url == "gs://media-archive/falflow"
    azure = open_bucket(
        BucketSettings(
            url="az://media/falflow", azure_account_name="acct", azure_account_key=SecretStr("a2V5")
        )
    )
    assert isinstance(azure.store, AzureStore)
    assert azure.store.prefix == "falflow"


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
