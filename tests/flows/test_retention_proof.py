"""Nothing is recorded ``deleted`` while fal still holds it: a pipeline against the emulator's
harshest readings of fal's contract (a just-completed request's payload row not visible yet,
empty and partial deletion answers, ``store_io`` off), the ledger compared with what the
emulator still stores."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falflow.emulator import Faults, RunningEmulator
from falflow.flows.pipeline import run_pipeline
from falflow.flows.summary import RunFailed, RunSummary
from falflow.tasks.models import JobRecord, JobState

SPEC = """
name: proof
params:
  words: {type: list, default: ["one", "two", "three"]}
steps:
  - name: kept
    endpoint: emulator/echo
    for_each: "{{ params.words }}"
    arguments: {output: {word: "{{ item }}"}, files: [{size: 256}, {size: 128}]}
  - name: unstored
    endpoint: emulator/echo
    for_each: "{{ params.words }}"
    arguments: {output: {word: "{{ item }}", io: off}, files: [{size: 64}]}
    retention: {store_io: false, media_ttl_seconds: 3600}
"""


@pytest.fixture
def harsh(emulator: RunningEmulator) -> Iterator[RunningEmulator]:
    emulator.configure(payload_row_delay_seconds=2.5)  # a first delete always answers 404
    yield emulator
    emulator.reset()


def _ledger(archive: Path, run_key: str) -> list[JobRecord]:
    return [
        JobRecord.model_validate_json(p.read_bytes())
        for p in (archive / "ledger" / run_key).glob("*.json")
    ]


def _run(run_key: str) -> RunSummary:
    try:
        return RunSummary.model_validate(asyncio.run(run_pipeline(SPEC, run_key=run_key)))
    except RunFailed as failed:
        return failed.summary


def _check_against_inventory(emulator: RunningEmulator, records: list[JobRecord]) -> None:
    """Every ``deleted`` record: fal holds no payload and serves no file of it, and the record
    carries its confirmation; every ``expiring`` one: no stored payload, every file hidden."""
    held: dict[str, Any] = emulator.inventory(hashes=False)
    files: dict[str, list[dict[str, Any]]] = {}
    for entry in held["files"]:
        files.setdefault(str(entry["request_id"]), []).append(entry)
    for record in records:
        assert record.request_id is not None
        left = files.get(record.request_id, [])
        if record.state is JobState.DELETED:
            assert record.request_id not in held["payloads"], record.job_id
            assert left == [], record.job_id
            assert record.deletion is not None
            assert record.deletion.confirmed_at is not None
            assert record.deletion.listing == "no stored payload"
            assert set(record.deletion.urls) == {o.source_url for o in record.objects}
        elif record.state is JobState.EXPIRING:
            assert record.expires_at is not None
            stored = held["payloads"].get(record.request_id)
            if stored is not None:  # store_io off: no stored input, the result only until its
                assert stored["input"] is False, record.job_id  # short retention ends
                assert stored["expires_at"] is not None, record.job_id
            assert all(f["acl"] in ("hide", "forbid") for f in left), left


def test_no_record_is_deleted_while_fal_still_holds_it(
    prefect_harness: None, harsh: RunningEmulator, archive: Path
) -> None:
    harsh.set_faults(Faults(empty_delete_results=1.0))
    summary = _run("proof")
    records = _ledger(archive, "proof")
    _check_against_inventory(harsh, records)
    kept = [r for r in records if r.job_id.startswith("kept-")]
    assert {r.state for r in kept} == {JobState.DELETE_UNCONFIRMED}  # fal said 200, did nothing
    assert all(r.deletion is not None and r.deletion.attempt >= 2 for r in kept)  # a key each
    assert not summary.ok
    assert len(summary.not_deleted) == 3

    harsh.set_faults(Faults(partial_cdn_delete=1.0))
    summary = _run("proof")  # the same run key: only the cleanup is left to do
    records = _ledger(archive, "proof")
    _check_against_inventory(harsh, records)
    # one file of each request fal could not delete: hidden, gone at the media TTL
    assert {r.state for r in records} == {JobState.EXPIRING}
    assert all(len(r.deletion.hidden) == 1 for r in records if r.job_id.startswith("kept-"))  # type: ignore[union-attr]
    assert len(summary.expiring) == 6
    assert summary.ok

    harsh.set_faults(Faults())
    records = _ledger(archive, "proof")
    assert sum(r.state is JobState.DELETED for r in records) == 0  # nothing claimed deleted


def test_a_clean_run_confirms_every_deletion_and_store_io_off_expires(
    prefect_harness: None, harsh: RunningEmulator, archive: Path
) -> None:
    summary = _run("proof-clean")
    records = _ledger(archive, "proof-clean")
    _check_against_inventory(harsh, records)
    states = {r.job_id.split("-")[0]: r.state for r in records}
    assert states == {"kept": JobState.DELETED, "unstored": JobState.EXPIRING}
    kept = [r for r in records if r.state is JobState.DELETED]
    # the first delete of each came too early (404, payload row not written yet): retried
    assert all(r.deletion is not None and r.deletion.attempt >= 2 for r in kept)
    assert summary.ok
    assert (summary.deleted, len(summary.expiring)) == (3, 3)
    held = harsh.inventory(hashes=False)
    ids = {r.request_id for r in kept}
    sent = [r for r in harsh.requests() if r["request_id"] in {x.request_id for x in records}]
    assert {r["output_acl"] for r in sent} == {"forbid"}  # private outputs: the key may sign
    assert not ids & set(held["payloads"])
    assert not [f for f in held["files"] if f["request_id"] in ids]
