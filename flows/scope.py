"""The retention scope: one run's requests, from the first submit to the confirmed cleanup.

Every request made inside a scope (a ``generate()`` step, a spec pipeline's item) runs in a lane
(:mod:`falflow.tasks.lanes`) and is archived into the bucket as soon as it completes. Its fal
copy is deleted as soon as it is archived and verified *and* nothing may still read its fal URLs:
whoever starts a request that reads another one holds it (:meth:`RetentionScope.hold`) until that
reader has finished, failed or been skipped (:meth:`RetentionScope.release`). Those deletions run
while the run goes on, in batches (task runs ``cleanup #<n>``) through the same paced, confirmed
path as the final cleanup. When the scope ends — after every request started in it has
finished, also when the body raised (requests in flight are let finish, new ones refused) — the
``cleanup`` task run sweeps what is left, and the rest is reported as a
:class:`~falflow.flows.summary.RunSummary`.

A *cancelled* scope (flow cancelled, Ctrl-C) cancels what is in flight and deletes nothing a
step that has not finished may still read — in a Python flow that is everything, in a spec
pipeline exactly the outputs of items whose readers are unfinished — so the resumed run can
still hand those fal URLs on; it deletes them at its end (else the janitor does). What fal
cancelled at the scope's request generated nothing: the resumed run submits it again.

Example::

    async with retention_scope(load_settings(), "nightly-2025-01-31") as scope:
        image = generate("fal-ai/flux/schnell", {"prompt": "a lighthouse at dusk"})
    print(scope.summary)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from prefect.context import FlowRunContext

from falflow.flows.console import outlive_the_console
from falflow.flows.summary import Problem, RunFailed, RunProgress, RunSummary, story
from falflow.settings import (
    RetentionOverride,
    RetentionPolicy,
    Settings,
    apply_override,
    load_settings,
)
from falflow.settings.blocks import with_blocks
from falflow.tasks.cleanup import CleanupReport, cleanup_task, gone_from_fal
from falflow.tasks.events import RunCounts, emit_run_finished
from falflow.tasks.jobs import JobOutcome
from falflow.tasks.lanes import Lanes, serving
from falflow.tasks.liveness import holding_lease
from falflow.tasks.models import Job, JobRecord, JobState, safe_segment
from falflow.tasks.platform import ACL_PERMITTED
from falflow.tasks.report import Progress, ReportItem, publish_report
from falflow.tasks.runtime import Runtime, new_run_key, open_runtime, run_logger

if TYPE_CHECKING:
    from falflow.flows.dsl import Step

ROLLING_BATCH_SECONDS = 0.5
"""How long a rolling deletion waits for more requests finishing at the same time."""
ROLLING_BATCH_SIZE = 200
"""Requests per rolling deletion (one task run); the Platform API's pacer spaces the calls."""

_SCOPE: ContextVar[RetentionScope | None] = ContextVar("falflow_scope", default=None)
_WATCHERS: ContextVar[RunProgress | None] = ContextVar("falflow_progress", default=None)


@contextmanager
def watching(progress: RunProgress) -> Iterator[RunProgress]:
    """Scopes opened inside this block (in this task, or flows it calls) count into ``progress``."""
    token = _WATCHERS.set(progress)
    try:
        yield progress
    finally:
        _WATCHERS.reset(token)


class RetentionScope:
    """One run's requests: lanes, records, progress; cleaned up when the scope ends."""

    def __init__(self, runtime: Runtime, progress: RunProgress, name: str) -> None:
        self.runtime = runtime
        self.progress = progress
        self.name = name
        """The pipeline's or flow's name: its artifacts' keys (one history per name)."""
        self.errors: dict[str, tuple[Job, BaseException]] = {}
        self.skipped: list[Problem] = []
        self.closing = False
        self.cancelled = False
        self.summary: RunSummary | None = None
        self.steps: list[Step] = []
        """The Python API's failed steps (the scope raises for those nobody awaited)."""
        self._still_read: Callable[[], Iterable[str]] = lambda: self._job_ids
        self._tg: TaskGroup | None = None
        self._lanes = Lanes(self, runtime.settings.limits.jobs_per_task_run, self.start)
        self._job_ids: set[str] = set()
        self._occurrences: dict[str, int] = {}
        self._labels: dict[str, tuple[str, str, str]] = {}
        """Job id → (step, label, endpoint) of every request made, in the order they were made."""
        self._skipped_steps: dict[str, str] = {}
        """Skipped label → its step."""
        self._per_step: dict[str, int] = {}
        self._artifact = Progress(name, runtime.run_key)
        self._holds: dict[str, int] = {}
        """Job id → readers that may still read its fal URLs (unfinished requests or steps)."""
        self._pinned: set[str] = set()
        """Job ids kept on fal until the scope ends (``generate(..., keep_until_scope_end=True)``)."""
        self._archived: set[str] = set()
        """Verified job ids not yet handed to a rolling deletion."""
        self._deleting: dict[str, anyio.Event] = {}
        """Job ids handed to a rolling deletion → set once it has ended (confirmed or not)."""
        self._queued: list[str] = []
        self._batches = 0
        self._rolled: dict[str, ReportItem] = {}
        """Job ids a rolling deletion confirmed gone → their row on the run page: the final
        cleanup does not read them again, so the scope holds no record per finished request."""
        self._rolled_counts = RunCounts()
        self._rolled_files = 0
        self.private_default = False
        """What ``private_outputs = None`` (auto) means in this run: the key may sign and hide."""

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def run_key(self) -> str:
        return self.runtime.run_key

    def policy_for(self, endpoint: str, retention: RetentionOverride | None) -> RetentionPolicy:
        """The endpoint's policy, with ``retention`` applied and ``private_outputs`` decided.

        Raises:
            ValueError: the override would keep outputs on fal forever.
        """
        policy = self.settings.retention.policy_for(endpoint)
        if retention is not None:
            policy = apply_override(policy, retention)
        if policy.private_outputs is None:
            policy = policy.model_copy(update={"private_outputs": self.private_default})
        return policy

    async def decide_private_outputs(self) -> None:
        """Whether ``private_outputs = None`` means on: only when the fal key may read file ACLs
        (and so sign URLs and hide files); asked once per run, only if some policy leaves it open."""
        retention = self.settings.retention
        open_ = retention.private_outputs is None or any(
            o.private_outputs is None for o in retention.overrides.values()
        )
        if not open_:
            return
        status = await self.runtime.platform.acl_status(self.settings.fal.cdn_url)
        self.private_default = status in ACL_PERMITTED
        if not self.private_default:
            run_logger().warning(
                "run %s: output files stay public on fal until cleanup: the fal key may not set "
                "file ACLs or sign URLs (HTTP %s). Give it the assets permissions, or set "
                "FALFLOW_RETENTION__PRIVATE_OUTPUTS=false to silence this",
                self.run_key,
                status or "error",
            )

    async def hide_uploads(self) -> None:
        """Set every input upload of this scope to ``hide``: fal's payload deletion never
        removes inputs, and their expiry may be far off."""
        for url in self.runtime.uploads:
            try:
                await self.runtime.platform.set_file_acl(url, "hide")
            except Exception as exc:
                run_logger().warning("run %s: an input upload stays visible: %s", self.run_key, exc)

    def attach(self, tg: TaskGroup) -> None:
        """The task group lanes and steps run in (the scope's own)."""
        self._tg = tg

    def start(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run ``func(*args)`` in the scope's task group (ended before cleanup)."""
        if self._tg is None:
            raise RuntimeError("this retention scope is not open: call generate() inside it")
        self._tg.start_soon(func, *args)

    def occurrence(self, key: str) -> int:
        """How many times ``key`` was counted before in this scope (identical requests' job ids)."""
        seen = self._occurrences.get(key, 0)
        self._occurrences[key] = seen + 1
        return seen

    # -- requests

    async def plan(self, count: int) -> None:
        """``count`` more requests will be made (for the progress bar and artifact)."""
        self.progress.planned += count
        await self._quietly(self._artifact.expect(count))

    async def run(self, job: Job, *, group: str, label: str | None = None) -> JobOutcome:
        """Make one request of step ``group`` in its current lane; raises ``JobFailed`` on a fal
        error. ``label`` names it on the run page (default: the step, numbered from its second
        request on)."""
        if job.job_id in self._job_ids:
            raise ValueError(f"job id {job.job_id!r} is used twice in run {self.run_key}")
        self._job_ids.add(job.job_id)
        seen = self._per_step.get(group, 0)
        self._per_step[group] = seen + 1
        label = label or (f"{group}[{seen}]" if seen else group)
        self._labels[job.job_id] = (group, label, job.endpoint)
        self.progress.started += 1
        return await self._lanes.run(job, group=group, label=label)

    @property
    def task_runs(self) -> int:
        """Prefect task runs this scope has made: one per lane and per rolling deletion, plus
        its final cleanup once it ran."""
        return len(self._lanes) + self._batches + (self.summary is not None)

    # -- what lanes report (the scope is their LaneHost)

    def note_unknown(self, job: Job, error: BaseException) -> None:
        self.errors[job.job_id] = (job, error)

    async def finished(self, outcome: JobOutcome | None) -> None:
        ok = outcome is not None and outcome.record.verified
        if outcome is not None and ok:
            self.progress.archived += 1
            self.progress.archived_bytes += outcome.record.archived_bytes
            if not gone_from_fal(outcome.record):  # (a resumed run may find it deleted)
                self._archived.add(outcome.record.job_id)
                self._delete_when_unread(outcome.record.job_id)
        else:
            self.progress.failed += 1
        await self._quietly(self._artifact.finished(ok=ok))

    # -- rolling deletion: fal's copy goes as soon as it is archived and nobody may read it

    def hold(self, job_id: str, readers: int = 1) -> bool:
        """``readers`` more requests or steps may read ``job_id``'s fal URLs: its fal copy stays
        until each has called :meth:`release`. False if its deletion has already begun: then
        :meth:`settled` tells when the archived copy is what a reader gets
        (:mod:`falflow.tasks.reserve` serves it in place of the dead URL)."""
        if job_id in self._deleting:
            return False
        self._holds[job_id] = self._holds.get(job_id, 0) + readers
        return True

    def release(self, job_id: str) -> None:
        """One reader of ``job_id`` has finished (or failed, or was skipped)."""
        self._holds[job_id] = self._holds.get(job_id, 0) - 1
        self._delete_when_unread(job_id)

    def pin(self, job_id: str) -> None:
        """Keep ``job_id`` on fal until the scope ends, whoever reads it."""
        self._pinned.add(job_id)

    async def settled(self, job_id: str) -> None:
        """Return once a rolling deletion of ``job_id`` that has begun has ended."""
        event = self._deleting.get(job_id)
        if event is not None:
            await event.wait()

    def _delete_when_unread(self, job_id: str) -> None:
        if (
            job_id in self._archived
            and self._holds.get(job_id, 0) <= 0
            and job_id not in self._pinned
            and not self.cancelled
        ):
            self._archived.discard(job_id)
            self._deleting[job_id] = anyio.Event()
            self._queued.append(job_id)
            if len(self._queued) == 1:
                self.start(self._delete_batch)

    async def _delete_batch(self) -> None:
        """Delete what was queued in the last moment, as one ``cleanup #<n>`` task run."""
        await anyio.sleep(ROLLING_BATCH_SECONDS)  # gather the requests finishing together
        batch, self._queued = self._queued[:ROLLING_BATCH_SIZE], self._queued[ROLLING_BATCH_SIZE:]
        if self._queued:
            self.start(self._delete_batch)
        self._batches += 1
        try:
            name = f"cleanup #{self._batches}"
            report = await cleanup_task.with_options(task_run_name=name)(batch)
        except Exception as exc:  # the final cleanup tries again
            run_logger().warning("run %s: a rolling deletion failed: %s", self.run_key, exc)
        else:
            gone = self.runtime.gone
            if gone is not None:
                for record in report.records:
                    if gone_from_fal(record):
                        gone.update((o.source_url, o) for o in record.objects)
            # (an expiring one is reported by the final cleanup: its summary lists those)
            rolled = [r for r in report.records if r.state is JobState.DELETED]
            for record in rolled:
                self._rolled[record.job_id] = self._item(record, "")
                self._rolled_files += len(record.objects)
            self._rolled_counts += RunCounts.of(rolled)
        finally:
            for job_id in batch:
                self._deleting[job_id].set()

    async def note_skipped(self, step: str, label: str, endpoint: str, reason: str) -> None:
        """A planned request of ``step`` (``label`` on the run page) that will not be made:
        ``reason`` says which failure it depends on."""
        self.skipped.append(
            Problem(job=label, item=label, endpoint=endpoint, state="skipped", error=reason)
        )
        self._skipped_steps[label] = step
        self.progress.skipped += 1
        await self._quietly(self._artifact.skipped_one())

    async def _quietly(self, update: Awaitable[None]) -> None:
        """Artifacts are for people watching: a Prefect API hiccup must not fail requests."""
        try:
            await update
        except Exception as exc:
            run_logger().warning("run %s: an artifact was not updated: %s", self.run_key, exc)

    # -- the end

    def keep_if_cancelled(self, still_read: Callable[[], Iterable[str]]) -> None:
        """Job ids a cancelled run keeps on fal because an unfinished step may still read their
        URLs once resumed (default: every job, as a Python flow's later steps are unknown)."""
        self._still_read = still_read

    def close(self) -> None:
        """No more requests: lanes with nothing in flight end now, the others when they drain."""
        self.closing = True
        self._lanes.wake()

    def unobserved_failures(self) -> list[Step]:
        return [step for step in self.steps if step.failed_unobserved]

    async def clean(self) -> RunSummary:
        """The cleanup task run, once every step has finished; then the table, summary and event."""
        self.progress.phase = "cleanup"
        kept = set(self._still_read()) & self._job_ids if self.cancelled else set()
        cleaned = await cleanup_task(sorted(self._job_ids - kept - self._rolled.keys()))
        if not kept:
            await self.hide_uploads()
        for job_id in sorted(kept):
            record = await self.runtime.ledger.get(self.run_key, job_id)
            if record is not None:
                cleaned.records.append(record)
        self.summary = self._summarise(cleaned, kept)
        items = self._report_items(cleaned.records, self.summary)
        ok, failed, skipped = self.summary.tally(len(items))
        left = len(self.summary.not_deleted) + len(self.summary.kept_for_resume)
        await self._quietly(self._artifact.close(ok, failed, skipped, left))
        markdown = story(self.summary, items, self.name)
        await self._quietly(publish_report(self.name, self.run_key, items, markdown))
        emit_run_finished(
            self.run_key,
            RunCounts.of(cleaned.records) + self._rolled_counts,
            flow=_flow_name(),
            status="completed" if self.summary.ok else "failed",
        )
        self.progress.phase = "done"
        return self.summary

    def _report_items(self, records: list[JobRecord], summary: RunSummary) -> list[ReportItem]:
        """One item per planned request, step by step (in the order steps first ran), items in
        their order within the step; skipped ones included."""
        by_id = {r.job_id: r for r in records}
        problems = {
            p.job: p.error or p.state
            for _, found in summary.sections()
            if found is not summary.skipped
            for p in found
        }
        items: list[ReportItem] = []
        for job_id, (step, label, endpoint) in self._labels.items():
            record = by_id.get(job_id)
            if record is not None:
                items.append(self._item(record, problems.get(job_id, "")))
            elif job_id in self._rolled:
                items.append(self._rolled[job_id])
            else:
                items.append(
                    ReportItem(
                        job_id=job_id,
                        step=step,
                        label=label,
                        endpoint=endpoint,
                        state="not started",
                        problem=problems.get(job_id, ""),
                    )
                )
        items += [
            ReportItem(
                job_id="",
                step=self._skipped_steps.get(p.job, p.job),
                label=p.job,
                endpoint=p.endpoint,
                state="skipped",
                problem=p.error,
            )
            for p in summary.skipped
        ]
        rank: dict[str, int] = {}
        for item in items:
            rank.setdefault(item.step, len(rank))
        return sorted(items, key=lambda i: (rank[i.step], _natural(i.label)))

    def _item(self, record: JobRecord, problem: str) -> ReportItem:
        """``record``'s row on the run page."""
        step, label, endpoint = self._labels.get(record.job_id, ("", "", record.endpoint))
        return ReportItem(
            job_id=record.job_id,
            step=step,
            label=label,
            endpoint=endpoint,
            state=record.state.value,
            problem=problem,
            size=record.archived_bytes,
            keys=tuple(o.key for o in record.objects),
        )

    def _label(self, job_id: str) -> str:
        found = self._labels.get(job_id)
        return found[1] if found else ""

    def _summarise(self, cleaned: CleanupReport, kept: set[str]) -> RunSummary:
        def problem(record: JobRecord, error: str | None = None) -> Problem:
            return Problem(
                job=record.job_id,
                item=self._label(record.job_id),
                endpoint=record.endpoint,
                state=record.state.value,
                request_id=record.request_id,
                error=error or _fal_error(record),
            )

        records = {r.job_id: r for r in cleaned.records}
        rolled = self._rolled_counts
        failed = [
            problem(r, f"{_fal_error(r)} (removed from fal)") if gone_from_fal(r) else problem(r)
            for r in records.values()
            if r.state is JobState.FAILED
        ]
        failed += [
            Problem(
                job=job.job_id,
                item=self._label(job.job_id),
                endpoint=job.endpoint,
                state=records[job.job_id].state.value if job.job_id in records else "not started",
                error=self.runtime.redact(_one_line(error)),
            )
            for job, error in self.errors.values()
            if job.job_id not in self._rolled
            and (
                job.job_id not in records
                or (
                    records[job.job_id].state is JobState.PENDING
                    and not records[job.job_id].submit_unknown
                )
            )
        ]
        unverified = [problem(r) for r in records.values() if r.unverified]
        unknown = [problem(r) for r in records.values() if r.submit_unknown]
        for_resume = [
            problem(records[j], "kept on fal: the resumed run reads it")
            for j in sorted(kept)
            if j in records and records[j].state is JobState.ARCHIVED
        ]
        not_deleted = [
            problem(records[k.job_id], k.reason)
            for k in cleaned.delete_failed
            if k.job_id in records
        ]
        expiring = [
            problem(r, f"hidden on fal, expires {r.expires_at:%Y-%m-%d %H:%M} UTC")
            for r in records.values()
            if r.state is JobState.EXPIRING and r.expires_at is not None
        ]
        allow_unverified = self.settings.retention.allow_unverified
        verified = [r for r in records.values() if r.verified]
        return RunSummary(
            run_key=self.run_key,
            bucket=self.runtime.bucket.url,
            requests=sum(r.request_id is not None for r in records.values()) + rolled.submitted,
            archived=len(verified) + rolled.archived,
            archived_files=sum(len(r.objects) for r in verified) + self._rolled_files,
            archived_bytes=sum(r.archived_bytes for r in verified)
            + sum(i.size for i in self._rolled.values()),
            deleted=sum(r.state is JobState.DELETED for r in records.values()) + rolled.deleted,
            failed=failed,
            skipped=list(self.skipped),
            unverified=unverified,
            unknown=unknown,
            not_deleted=not_deleted,
            expiring=expiring,
            kept_for_resume=for_resume,
            ok=not (
                failed
                or self.skipped
                or unknown
                or not_deleted
                or for_resume
                or (unverified and not allow_unverified)
            ),
        )


def _fal_error(record: JobRecord) -> str:
    """``type: message`` of a request's error (either may be missing)."""
    return ": ".join(part for part in (record.error_type, record.error) if part)


def _natural(label: str) -> tuple[str, int]:
    """``image[10]`` after ``image[9]``."""
    head, _, index = label.rpartition("[")
    number = index.rstrip("]")
    return (head, int(number)) if head and number.isdigit() else (label, -1)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def current_scope() -> RetentionScope:
    """The innermost open retention scope.

    Raises:
        RuntimeError: saying how to open one.
    """
    scope = _SCOPE.get()
    if scope is None:
        raise RuntimeError(
            "no retention scope is open: decorate the flow with @retained (under @flow) or wrap "
            "its body in `async with retention_scope():`"
        )
    return scope


def default_run_key(name: str) -> str:
    """``<name>-<flow run id>`` inside a flow run (a retried flow run resumes), else a fresh key."""
    context = FlowRunContext.get()
    prefix = safe_segment(name, max_length=40)
    if context is not None and context.flow_run is not None:
        return f"{prefix}-{context.flow_run.id}"
    return f"{prefix}-{new_run_key()}"


@asynccontextmanager
async def retention_scope(
    settings: Settings | None = None, run_key: str | None = None, *, name: str | None = None
) -> AsyncIterator[RetentionScope]:
    """Open the run's runtime and hold its lease (:mod:`falflow.tasks.liveness`); on exit wait for
    every request, then clean up (also on error). Without ``settings``, they are read from the
    environment and the blocks it names (:func:`~falflow.settings.blocks.with_blocks`).
    ``name`` (default: the flow's name) keys the run's artifacts, so runs of one pipeline or flow
    share a history in the UI.

    Raises:
        falflow.settings.SettingsError: the configuration is invalid (nothing was submitted).
        RunFailed: a step failed and the body never awaited it (raised after cleanup).
    """
    outlive_the_console()
    settings = settings or await with_blocks(load_settings())
    run_key = run_key or default_run_key(_flow_name())
    progress = _WATCHERS.get() or RunProgress()
    progress.run_key, progress.phase = run_key, "running"
    body_error: BaseException | None = None
    async with (
        open_runtime(settings, run_key) as runtime,
        holding_lease(runtime.bucket, run_key, _flow_run_id(), settings.limits.lease_seconds),
    ):
        scope = RetentionScope(runtime, progress, name or _flow_name())
        await scope.decide_private_outputs()
        token = _SCOPE.set(scope)
        try:
            with serving(scope._lanes):
                async with anyio.create_task_group() as tg:
                    scope.attach(tg)
                    try:
                        yield scope
                    except Exception as exc:
                        # Let requests in flight finish and archive (they are paid for); new
                        # generate() calls are refused. Cancellation instead cancels them.
                        body_error = exc
                    except BaseException:
                        scope.cancelled = True
                        raise
                    finally:
                        scope.close()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await scope.clean()
                finally:
                    _SCOPE.reset(token)
    if body_error is not None:
        raise body_error
    if scope.unobserved_failures() and scope.summary is not None:
        raise RunFailed(scope.summary)


def _flow_run_id() -> str | None:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context is not None and context.flow_run else None


def _flow_name() -> str:
    context = FlowRunContext.get()
    return context.flow.name if context is not None and context.flow is not None else "falflow"
