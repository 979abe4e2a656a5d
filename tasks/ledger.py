"""The ledger: one small JSON record per request in the user's bucket.

Layout: ``ledger/{run_key}/{job_id}.json`` holds a :class:`~falflow.tasks.models.JobRecord`, rewritten at
every transition. A re-run resumes from it, the janitor lists it, and a person can read it; it
never holds a secret (records carry only retention headers, ids, keys, sizes and hashes).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import AsyncIterator, Sequence

import anyio

from falflow.tasks.models import JobRecord
from falflow.tasks.store import Bucket

LEDGER_PREFIX = "ledger"
RUNS_PREFIX = "runs"

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
_LIST_CONCURRENCY = 16
_IO_CONCURRENCY = 64
"""Ledger reads and writes at once, whoever asks: a run of 10,000 requests must not open 10,000
files (or connections) together — it ran out of file descriptors before this bound existed."""


def check_segment(value: str, what: str) -> str:
    """``value`` if it is usable as one bucket-key segment as is, else a ValueError saying why.

    Run keys and job ids are refused rather than rewritten: two different run keys must never
    share a ledger.
    """
    if not _SEGMENT.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value[:130]!r} cannot be used in bucket keys: use 1-120 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. 'nightly-2025-01-31')"
        )
    return value


SHARD_MARK = ".shard-"
"""``<run key>.shard-<i>``: the run key of shard ``i`` of a sharded run (``falflow.flows.shards``);
a '.' keeps it one bucket-key segment, so each shard has its own ledger and lease."""


def shard_run_key(run_key: str, index: int) -> str:
    """Shard ``index``'s run key.

    Raises:
        ValueError: the run key is too long to carry the suffix (or is not a run key).
    """
    return check_segment(f"{run_key}{SHARD_MARK}{index}", "shard run key")


def parent_run_key(run_key: str) -> str | None:
    """The sharded run a shard's run key belongs to (None for any other run key)."""
    parent, mark, index = run_key.rpartition(SHARD_MARK)
    return parent if mark and parent and index.isdigit() else None


def run_prefix(run_key: str, job_id: str) -> str:
    """Where a request's archived files and JSON documents go."""
    return f"{RUNS_PREFIX}/{check_segment(run_key, 'run key')}/{check_segment(job_id, 'job id')}"


class Ledger:
    """Read and write :class:`JobRecord` documents in a bucket."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._owners: dict[str, tuple[str, str]] = {}
        """Request id → (run key, job id) of every record this ledger has read or written."""
        self._listed: set[str] = set()
        self._io = anyio.CapacityLimiter(_IO_CONCURRENCY)
        self.writes = 0
        """Records written so far (each rewrites a whole record: benchmarks and tests watch it)."""

    @staticmethod
    def key(run_key: str, job_id: str) -> str:
        run = check_segment(run_key, "run key")
        return f"{LEDGER_PREFIX}/{run}/{check_segment(job_id, 'job id')}.json"

    async def get(self, run_key: str, job_id: str) -> JobRecord | None:
        async with self._io:
            data = await self.bucket.get_bytes(self.key(run_key, job_id))
        return None if data is None else self._seen(JobRecord.model_validate_json(data))

    async def put(self, record: JobRecord) -> JobRecord:
        """Write ``record`` (indented, so a person can read it) and return it."""
        data = record.model_dump_json(indent=2).encode()
        async with self._io:
            await self.bucket.put_bytes(self.key(record.run_key, record.job_id), data)
        self.writes += 1
        return self._seen(record)

    async def owner_of(self, run_key: str, request_id: str) -> str | None:
        """The job of ``run_key`` whose record holds ``request_id``, if any (lists the run's
        records once, then answers from memory)."""
        if run_key not in self._listed:
            async for _ in self.list(run_key):
                pass
            self._listed.add(run_key)
        run, job_id = self._owners.get(request_id, (None, None))
        return job_id if run == run_key else None

    def _seen(self, record: JobRecord) -> JobRecord:
        if record.request_id is not None:
            self._owners[record.request_id] = (record.run_key, record.job_id)
        return record

    async def list(self, run_key: str | None = None) -> AsyncIterator[JobRecord]:
        """Every record of ``run_key``, or of every run when it is None (in key order per page)."""
        prefix = (
            LEDGER_PREFIX
            if run_key is None
            else f"{LEDGER_PREFIX}/{check_segment(run_key, 'run key')}"
        )
        page: builtins.list[str] = []
        async for key in self.bucket.keys(prefix):
            if key.endswith(".json"):
                page.append(key)
            if len(page) >= _LIST_CONCURRENCY * 4:
                for record in await self._read_all(page):
                    yield record
                page = []
        for record in await self._read_all(page):
            yield record

    async def _read_all(self, keys: Sequence[str]) -> builtins.list[JobRecord]:
        """Read ``keys`` concurrently, keeping their order; a key deleted meanwhile is skipped."""
        found: builtins.list[JobRecord | None] = [None] * len(keys)
        limiter = anyio.CapacityLimiter(_LIST_CONCURRENCY)  # one listing leaves room for the run

        async def read(index: int, key: str) -> None:
            async with limiter, self._io:
                data = await self.bucket.get_bytes(key)
            if data is not None:
                found[index] = self._seen(JobRecord.model_validate_json(data))

        async with anyio.create_task_group() as tg:
            for index, key in enumerate(keys):
                tg.start_soon(read, index, key)
        return [record for record in found if record is not None]
