"""What a run shows in Prefect: a progress artifact while requests finish; at the end a table
with one row per planned request and a markdown summary that tells the run's story.

Artifact keys are stable per pipeline or flow (``falflow-<name>-summary``, ``-requests``,
``-progress``), so the UI's artifact pages show each one's history across runs. Artifacts are
only made inside a Prefect flow or task run (plain-function tests make none). None ever holds a
secret: rows carry labels, states, sizes, bucket keys and ledger-safe error text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import anyio
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from falflow.tasks.models import JobRecord

MAX_TABLE_ROWS = 2000
"""A 10,000-request run would make a table the UI cannot show; problems are listed first."""
MAX_PROBLEM_CHARS = 40
"""A table cell's problem text (the markdown summary and the ledger have it whole): keeps the
table readable without scrolling sideways."""
_PROGRESS_EVERY_SECONDS = 1.0


def in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(kind: str, name: str) -> str:
    """The key of a pipeline's (or flow's) ``kind`` artifact: the same for every run of it, so
    the UI keeps a history. Keys allow only lowercase letters, digits and dashes."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removeprefix("falflow-")
    return f"falflow-{cleaned or 'run'}"[: 100 - len(kind) - 1] + f"-{kind}"


def human_bytes(count: int) -> str:
    """``1.2 MB``, ``512 B`` (decimal units, like fal's and most storage consoles)."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def counts_text(ok: int, failed: int, skipped: int) -> str:
    """``7 ok · 1 failed · 2 skipped``: the one wording of a run's tally."""
    return f"{ok} ok · {failed} failed · {skipped} skipped"


class Progress:
    """A run's progress artifact, updated at most once a second as requests finish.

    The bar shows the share of planned requests that went through (archived and verified), so a
    run with failures never reaches 100 %; the description tallies ok, failed and skipped.
    """

    def __init__(self, name: str, run_key: str) -> None:
        self.name, self.run_key = name, run_key
        self.total = self.ok = self.failed = self.skipped = 0
        self.left_on_fal = 0
        self._artifact: UUID | None = None
        self._last_update = 0.0
        self._lock = anyio.Lock()

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def percent(self) -> float:
        return 100.0 * self.ok / self.total if self.total else 0.0

    @property
    def description(self) -> str:
        text = counts_text(self.ok, self.failed, self.skipped)
        if self.done < self.total:
            text += f" · {self.total - self.done} to go"
        if self.left_on_fal:
            text += f" · {self.left_on_fal} left on fal"
        return f"{text} (run {self.run_key})"

    async def expect(self, count: int) -> None:
        """``count`` more requests will report to this run's progress."""
        self.total += count
        await self._publish(force=self._artifact is None)

    async def finished(self, *, ok: bool) -> None:
        """A request ended: archived and verified (``ok``), or not."""
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        await self._publish(force=self.done >= self.total)

    async def skipped_one(self) -> None:
        self.skipped += 1
        await self._publish(force=self.done >= self.total)

    async def close(self, ok: int, failed: int, skipped: int, left_on_fal: int) -> None:
        """The run's last word, from its summary: what cleanup could not delete is counted too."""
        self.ok, self.failed, self.skipped, self.left_on_fal = ok, failed, skipped, left_on_fal
        self.total = max(self.total, self.done)
        await self._publish(force=True)

    async def _publish(self, *, force: bool) -> None:
        if not in_prefect_run() or (self._lock.locked() and not force):
            return
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last_update < _PROGRESS_EVERY_SECONDS:
                return
            self._last_update = now
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(
                    self.percent,
                    key=artifact_key("progress", self.name),
                    description=self.description,
                )
            else:
                await aupdate_progress_artifact(
                    self._artifact, self.percent, description=self.description
                )


def batch_summary(total: int, records: Sequence[JobRecord]) -> str:
    """One log line for a batch of ``total`` requests (``records``: those that got a record):
    how many were archived, with their bytes, and how many were not."""
    verified = [r for r in records if r.verified]
    return (
        f"{total} requests: {len(verified)} archived "
        f"({human_bytes(sum(r.archived_bytes for r in verified))}), {total - len(verified)} not"
    )


@dataclass(frozen=True)
class ReportItem:
    """One planned request as the run page shows it (made, failed or skipped)."""

    job_id: str
    """The ledger's job id (empty for a skipped item: it never became a request)."""
    step: str
    label: str
    """``step[index]`` for a fanned-out step, else the step's name."""
    endpoint: str
    state: str
    """The ledger state, or ``skipped`` / ``not started``."""
    problem: str = ""
    size: int = 0
    keys: tuple[str, ...] = ()
    """The archived files' keys in the bucket."""

    @property
    def ok(self) -> bool:
        return not self.problem


def table_rows(items: Sequence[ReportItem], run_key: str) -> list[dict[str, str]]:
    """One row per item in the given order (problems first when there are too many to show):
    item, state, problem, size, archive (the first file, relative to the run's folder)."""
    shown = list(items)
    if len(shown) > MAX_TABLE_ROWS:
        shown = sorted(shown, key=lambda i: i.ok)[:MAX_TABLE_ROWS]
    folder = f"runs/{run_key}/"
    rows = []
    for item in shown:
        archive = item.keys[0].removeprefix(folder) if item.keys else ""
        if len(item.keys) > 1:
            archive += f" (+{len(item.keys) - 1})"
        problem = item.problem
        if len(problem) > MAX_PROBLEM_CHARS:
            problem = problem[: MAX_PROBLEM_CHARS - 1] + "…"
        rows.append(
            {
                "item": item.label,
                "state": item.state,
                "problem": problem,
                "size": human_bytes(item.size) if item.keys else "",
                "archive": archive,
            }
        )
    return rows


async def publish_report(
    name: str, run_key: str, items: Sequence[ReportItem], markdown: str
) -> None:
    """The run's table (one row per planned request) and its markdown summary."""
    if not in_prefect_run():
        return
    shown = (
        "" if len(items) <= MAX_TABLE_ROWS else f"; first {MAX_TABLE_ROWS} shown, problems first"
    )
    await acreate_table_artifact(
        table_rows(items, run_key),
        key=artifact_key("requests", name),
        description=f"Run {run_key}: one row per planned request{shown}. "
        f"Archive paths are under runs/{run_key}/ in the bucket.",
    )
    await acreate_markdown_artifact(
        markdown, key=artifact_key("summary", name), description=f"Run {run_key}"
    )
