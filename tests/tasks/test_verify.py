"""``falflow verify``: a run archived through the pipeline, then damaged in the bucket behind
falflow's back (a flipped byte, a deleted file, a deleted document), is caught on a directory, on
SeaweedFS S3 and read back from fake-gcs-server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import obstore
import pytest

from bench.servers import GCSServer
from falflow.cli import main
from falflow.settings import BucketSettings, Settings
from falflow.tasks.models import Job, JobRecord
from falflow.tasks.runtime import open_runtime
from falflow.tasks.store import Bucket, open_bucket, settle
from falflow.tasks.verify import verify
from tests.support.jobs import run_jobs

SettingsFor = Callable[..., Settings]


def _archive_run(settings: Settings, run_key: str) -> list[JobRecord]:
    """Two requests of two files each, archived through the pipeline."""
    jobs = [
        Job(
            job_id=Job.make_id(run_key, "step", index),
            endpoint="emulator/echo",
            arguments={
                "output": {"n": index},
                "files": [{"size": 3000 + index}, {"size": 70_000 + index}],
            },
            policy=settings.retention.policy_for("emulator/echo"),
        )
        for index in range(2)
    ]

    async def main() -> list[JobRecord]:
        async with open_runtime(settings, run_key) as rt:
            outcomes, failures = await run_jobs(rt, jobs)
        assert failures == []
        return [o.record for o in outcomes]

    records = anyio.run(main)
    assert all(r.verified and len(r.objects) == 2 for r in records)
    return records


async def _flip_byte(bucket: Bucket, key: str, at: int) -> None:
    data = bytearray(await (await obstore.get_async(bucket.store, key)).bytes_async())
    data[at] ^= 0x01
    await obstore.put_async(bucket.store, key, bytes(data))


def _damage(bucket_settings: BucketSettings, records: list[JobRecord]) -> tuple[str, str, str]:
    """Flip a byte of one file, delete another file and one ``archived.json``: their keys."""
    flipped, deleted = records[0].objects[1].key, records[1].objects[0].key
    document = records[1].archived_output_key or ""

    async def main() -> None:
        bucket = open_bucket(bucket_settings)
        await _flip_byte(bucket, flipped, at=12_345)
        await obstore.delete_async(bucket.store, [deleted, document])
        await settle()

    anyio.run(main)
    return flipped, deleted, document


@pytest.mark.parametrize("bucket_kind", ["file", "seaweedfs"])
def test_a_flipped_byte_and_deleted_objects_are_caught(
    bucket_kind: str, settings_for: SettingsFor, request: pytest.FixtureRequest
) -> None:
    bucket_settings: BucketSettings = request.getfixturevalue(f"{bucket_kind}_bucket")
    run_key = f"verify-{bucket_kind}"
    records = _archive_run(settings_for(bucket_settings), run_key)
    total = sum(r.archived_bytes for r in records)

    clean = anyio.run(lambda: verify(open_bucket(bucket_settings), run_key=run_key))
    assert clean.ok
    assert (clean.records, clean.objects, clean.bytes) == (2, 10, total)  # 4 files, 6 documents

    flipped, deleted, document = _damage(bucket_settings, records)
    report = anyio.run(lambda: verify(open_bucket(bucket_settings), run_key=run_key))
    assert not report.ok
    found = {d.key: (d.problem, d.note) for d in report.damage}
    assert set(found) == {flipped, deleted, document}
    assert found[flipped][0] == "changed"
    assert "sha256" in found[flipped][1]
    assert found[deleted] == ("missing", "not in the bucket (the ledger has 3001 bytes)")
    assert found[document][0] == "missing"
    assert "1 changed" in report.lines()[0]
    assert "2 missing" in report.lines()[0]


def test_the_command_prints_the_damage_and_exits_by_what_it_found(
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    records = _archive_run(settings_for(file_bucket), "nightly-1")
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    monkeypatch.setenv("FALFLOW_BUCKET__URL", file_bucket.url)

    assert main(["verify", "nightly-1"]) == 0
    assert "all match the ledger" in capsys.readouterr().out

    flipped, _, _ = _damage(file_bucket, records)
    assert main(["verify", "nightly-1"]) == 1
    out = capsys.readouterr().out
    assert f"changed: {flipped}" in out
    assert "2 missing, 1 changed" in out

    assert main(["verify", "no-such-run"]) == 2
    assert "no ledger records for run 'no-such-run'" in capsys.readouterr().err
    assert main(["verify", "../etc"]) == 2
    assert "cannot be used in bucket keys" in capsys.readouterr().err


def test_a_sample_checks_that_many_objects_across_runs(
    settings_for: SettingsFor, file_bucket: BucketSettings
) -> None:
    settings = settings_for(file_bucket)
    _archive_run(settings, "sample-a")
    _archive_run(settings, "sample-b")

    report = anyio.run(lambda: verify(open_bucket(file_bucket), sample=3))
    assert report.ok
    assert (report.run_key, report.records, report.objects) == (None, 4, 3)


def test_a_run_read_back_from_gcs_is_verified(
    settings_for: SettingsFor,
    file_bucket: BucketSettings,
    gcs_server: GCSServer,
    gcs_bucket: BucketSettings,
) -> None:
    """A run archived into a directory, copied to fake-gcs-server as is (through its JSON API:
    it answers none of obstore's uploads), is read back, re-hashed and checked there."""
    records = _archive_run(settings_for(file_bucket), "to-gcs")
    root = Path(file_bucket.url.removeprefix("file://"))
    prefix = gcs_bucket.url.removeprefix(f"gs://{gcs_server.bucket}/")
    for path in root.rglob("*"):
        if path.is_file():
            gcs_server.upload(f"{prefix}/{path.relative_to(root)}", path.read_bytes())

    assert anyio.run(lambda: verify(open_bucket(gcs_bucket), run_key="to-gcs")).ok

    key = records[0].objects[0].key
    data = bytearray((root / key).read_bytes())
    data[7] ^= 0x80
    gcs_server.upload(f"{prefix}/{key}", bytes(data))
    report = anyio.run(lambda: verify(open_bucket(gcs_bucket), run_key="to-gcs"))
    assert [(d.key, d.problem) for d in report.damage] == [(key, "changed")]
