"""What a run shows in Prefect: a progress artifact while requests finish, a table at the end.

Artifacts are only made inside a Prefect flow or task run (plain-function tests make none).
Neither ever holds a secret: rows carry ids, states, counts and ledger-safe error text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from uuid import UUID

import anyio
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from falflow.tasks.models import JobRecord, JobState

MAX_TABLE_ROWS = 2000
"""A 10,000-request run would make a table the UI cannot show; problems are listed first."""
_PROGRESS_EVERY_SECONDS = 1.0


def in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(kind: str, run_key: str) -> str:
    """Artifact keys allow only lowercase letters, digits and dashes."""
    cleaned = "".join(c if c.isalnum() else "-" for c in run_key.lower()).strip("-")
    return f"falflow-{kind}-{cleaned}"[:100]


class Progress:
    """A progress artifact for a run, updated at most once a second as requests finish."""

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key
        self.total = 0
        self.done = 0
        self._artifact: UUID | None = None
        self._last_update = 0.0
        self._lock = anyio.Lock()

    async def expect(self, count: int) -> None:
        """``count`` more requests will report to this run's progress."""
        self.total += count
        await self._publish(force=self._artifact is None)

    async def finished(self, count: int = 1) -> None:
        self.done += count
        await self._publish(force=self.done >= self.total)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    async def _publish(self, *, force: bool) -> None:
        if not in_prefect_run() or (self._lock.locked() and not force):
            return
        async with self._lock:
            # Callers queued behind the first create were forced to make it exist; once it does,
            # only the final 100 % skips the throttle (one update per request flooded the API).
            force = force and (self._artifact is None or self.done >= self.total)
            now = time.monotonic()
            if not force and now - self._last_update < _PROGRESS_EVERY_SECONDS:
                return
            self._last_update = now
            description = f"{self.done} of {self.total} requests finished (run {self.run_key})"
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(
                    self.percent,
                    key=artifact_key("progress", self.run_key),
                    description=description,
                )
            else:
                await aupdate_progress_artifact(
                    self._artifact, self.percent, description=description
                )


def batch_summary(total: int, records: Sequence[JobRecord]) -> str:
    """One log line for a batch of ``total`` requests (``records``: those that got a record):
    how many were archived, with their bytes, and how many were not."""
    verified = [r for r in records if r.verified]
    return (
        f"{total} requests: {len(verified)} archived "
        f"({sum(r.archived_bytes for r in verified):,} bytes), {total - len(verified)} not"
    )


def table_rows(records: Sequence[JobRecord]) -> list[dict[str, str | int]]:
    """One row per request, problems first (anything not deleted), then by job id."""
    ordered = sorted(records, key=lambda r: (r.state == JobState.DELETED, r.job_id))
    rows: list[dict[str, str | int]] = []
    for record in ordered[:MAX_TABLE_ROWS]:
        rows.append(
            {
                "request": record.request_id or "-",
                "job": record.job_id,
                "endpoint": record.endpoint,
                "state": record.state.value,
                "objects": len(record.objects),
                "bytes": record.archived_bytes,
                "deleted": _deleted(record),
                "problem": record.error or "",
            }
        )
    return rows


async def publish_table(run_key: str, records: Sequence[JobRecord]) -> None:
    """The run's table artifact (request, endpoint, state, objects, bytes, deleted)."""
    if not in_prefect_run():
        return
    deleted = sum(r.state == JobState.DELETED for r in records)
    shown = "" if len(records) <= MAX_TABLE_ROWS else f" (first {MAX_TABLE_ROWS} rows shown)"
    await acreate_table_artifact(
        table_rows(records),
        key=artifact_key("requests", run_key),
        description=(
            f"falflow run {run_key}: {len(records)} requests, {deleted} archived and deleted "
            f"from fal, {sum(r.archived_bytes for r in records)} bytes archived{shown}"
        ),
    )


def _deleted(record: JobRecord) -> str:
    if record.state is JobState.DELETED and record.deletion is not None:
        return "confirmed" if record.deletion.confirmed_at is not None else "yes"
    if record.state is JobState.EXPIRING and record.expires_at is not None:
        return f"hidden, expires {record.expires_at:%Y-%m-%d %H:%M} UTC"
    if record.state is JobState.DELETE_UNCONFIRMED:
        return "not confirmed"
    return "no"
