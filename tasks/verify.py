"""Archive integrity over time: re-read what a run archived, re-hash it, compare with the ledger.

Once fal's copy is deleted the bucket holds the only one, so a flipped bit, a truncated or a
deleted object must be found while someone can still act on it. :func:`verify` reads every file
a run's ledger records list (or a random sample across runs, as the janitor does), streams it
through sha256 and compares size and hash with the record; the JSON documents a record names
(``input.json``, ``output.json``, ``archived.json``, ``error.json``) carry no hash in the
ledger, so they are checked to exist. ``falflow verify RUN_KEY`` prints the report.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

import anyio
import obstore
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from falflow.tasks.ledger import Ledger
from falflow.tasks.models import JobRecord
from falflow.tasks.runtime import current_runtime
from falflow.tasks.store import NOT_FOUND, Bucket

READ_CHUNK_BYTES = 4 * 1024 * 1024
CONCURRENCY = 4
"""Objects read at once: memory stays near ``CONCURRENCY × READ_CHUNK_BYTES``."""


class Damage(BaseModel):
    """One archived object that is not what the ledger says it is."""

    run_key: str
    job_id: str
    endpoint: str
    state: str
    """The ledger record's state (e.g. ``deleted``: the bucket held the only copy)."""
    key: str
    problem: Literal["missing", "changed"]
    note: str


class VerifyReport(BaseModel):
    """What was read back, and what did not match the ledger."""

    run_key: str | None
    """The run verified, or None for a sample across every run."""
    records: int = 0
    objects: int = 0
    """Objects checked: files re-hashed and documents found."""
    bytes: int = 0
    """Bytes read and re-hashed."""
    damage: list[Damage] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    def lines(self) -> list[str]:
        """A summary a person reads: the counts, then every damaged object."""
        what = f"run {self.run_key}" if self.run_key else "a sample of every run"
        head = (
            f"{what}: {self.objects} objects of {self.records} ledger records checked, "
            f"{self.bytes:,} bytes re-hashed: "
        )
        if self.ok:
            return [head + "all match the ledger"]
        counts = {p: sum(d.problem == p for d in self.damage) for p in ("missing", "changed")}
        lines = [head + f"{counts['missing']} missing, {counts['changed']} changed"]
        lines += [f"  {d.problem}: {d.key} ({d.run_key}/{d.job_id}): {d.note}" for d in self.damage]
        return lines


@dataclass(frozen=True)
class _Item:
    record: JobRecord
    key: str
    size: int | None = None
    sha256: str | None = None
    """None for a document: only its presence is checked."""


def _items(record: JobRecord) -> list[_Item]:
    documents = (
        record.input_key,
        record.output_key,
        record.archived_output_key,
        record.error_key,
    )
    items = [_Item(record, key) for key in documents if key is not None]
    items += [_Item(record, o.key, o.size, o.sha256) for o in record.objects]
    return items


async def verify(
    bucket: Bucket, *, run_key: str | None = None, sample: int | None = None
) -> VerifyReport:
    """Check the archive of ``run_key`` (None: every run) against its ledger records; with
    ``sample``, only that many objects picked at random among them.

    Raises:
        ValueError: ``run_key`` cannot be a run key.
    """
    records = [record async for record in Ledger(bucket).list(run_key)]
    items = [item for record in records for item in _items(record)]
    if sample is not None and sample < len(items):
        items = random.sample(items, sample)
    report = VerifyReport(run_key=run_key, records=len(records), objects=len(items))
    limiter = anyio.CapacityLimiter(CONCURRENCY)

    async def one(item: _Item) -> None:
        async with limiter:
            damage, read = await _check(bucket, item)
        report.bytes += read
        if damage is not None:
            report.damage.append(damage)

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
    report.damage.sort(key=lambda d: (d.run_key, d.job_id, d.key))
    return report


async def _check(bucket: Bucket, item: _Item) -> tuple[Damage | None, int]:
    """What is wrong with ``item`` in the bucket (None: nothing), and the bytes read."""

    def damage(problem: Literal["missing", "changed"], note: str) -> Damage:
        return Damage(
            run_key=item.record.run_key,
            job_id=item.record.job_id,
            endpoint=item.record.endpoint,
            state=item.record.state.value,
            key=item.key,
            problem=problem,
            note=note,
        )

    if item.sha256 is None:
        found = await bucket.size(item.key) is not None
        return (None if found else damage("missing", "not in the bucket")), 0
    digest = hashlib.sha256()
    size = 0
    try:
        result = await obstore.get_async(bucket.store, item.key)
        async for chunk in result.stream(min_chunk_size=READ_CHUNK_BYTES):
            size += len(chunk)
            await anyio.to_thread.run_sync(digest.update, chunk)  # off the event loop
    except NOT_FOUND:
        return damage("missing", f"not in the bucket (the ledger has {item.size} bytes)"), size
    if size != item.size:
        return damage("changed", f"{size} bytes, the ledger has {item.size}"), size
    if digest.hexdigest() != item.sha256:
        note = f"sha256 {digest.hexdigest()[:16]}…, the ledger has {item.sha256[:16]}…"
        return damage("changed", note), size
    return None, size


@task(name="falflow-verify", cache_policy=NONE, persist_result=False)
async def verify_task(run_key: str | None = None, sample: int | None = None) -> VerifyReport:
    """:func:`verify` on the bucket of the current runtime."""
    return await verify(current_runtime().bucket, run_key=run_key, sample=sample)
