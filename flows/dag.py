"""Generation DAGs in Python: ``generate()`` steps inside a retention scope.

Inside any async Prefect flow::

    import asyncio
    from prefect import flow
    from flows.dag import generate, ref, retained
    from settings import RetentionOverride

    @flow
    @retained                      # opens a retention scope around the flow body
    async def storyboard(prompts: list[str]) -> list[str]:
        async def one(prompt: str) -> str:
            image = generate("fal-ai/flux/schnell", {"prompt": prompt}, name="image")
            # ref() makes this step wait for `image` and read its output; no await needed
            video = generate(
                "fal-ai/kling-video/v2.1/standard/image-to-video",
                {"image_url": ref(image, "images[0].url"), "prompt": "slow push-in"},
                retention=RetentionOverride(media_ttl_seconds=3600),
                name="video",
            )
            return (await video).output["video"]["url"]

        return await asyncio.gather(*(one(p) for p in prompts))   # fan-out is plain Python

``generate(endpoint, arguments)`` starts the request at once and returns a :class:`Step`; await it
for a :class:`StepResult` (``.output`` is fal's output JSON, ``.record`` the ledger record), or
pass ``ref(step, "path")`` / ``step.ref("path")`` anywhere in a later step's arguments. Every
request is archived into the bucket as soon as it completes. When the scope ends — after every
step started in it has finished, also when the body raised (requests in flight are let finish,
new ``generate()`` calls refused) — the cleanup task deletes fal's copy of every verified archive
and reports the rest; the scope then raises :class:`StepsFailed` if a step failed and nobody
awaited it. ``async with retention_scope(settings, run_key) as scope:`` is the same without the
decorator, with ``scope.summary`` readable after the block.

Job ids hash the step name, endpoint and arguments, so re-running with the same run key resumes
from the ledger (nothing recorded is submitted again). A *cancelled* scope (flow cancelled,
Ctrl-C) cancels what is in flight and deletes nothing a step that has not finished may still
read — in a Python flow that is everything, in a spec pipeline exactly the outputs of items whose
readers are unfinished — so the resumed run can still hand those fal URLs on; it deletes them
at its end (else the janitor does).

Prefect granularity: requests are batched into *lanes*, not one task run each
-----------------------------------------------------------------------------
The OSS Prefect server loses task runs past ~5,000 queued events and each task run costs
5–12 ms, so one task run per fal request does not scale to thousands. Instead each step (the
``name=`` given to ``generate``, else its endpoint; a spec step's name) feeds its requests to a
lane: one Prefect task run ``falflow-jobs`` named ``<step> #<n>`` that takes up to
``limits.jobs_per_task_run`` requests (default 50) as they become ready and runs them
concurrently (submit → wait → archive). A lane stops taking requests when it is full, or when it
has nothing in flight for ``LANE_IDLE_SECONDS`` (1 s); the next request opens a new lane. So a
step of N requests makes about ``ceil(N / jobs_per_task_run)`` task runs (plus one per idle gap
longer than a second), and a request never waits for a lane: it joins the step's open lane at
once or opens the next, so item i of a chain never waits for item j. A lane ends ``Failed`` when
any of its requests failed or could not be verified (its siblings are unaffected) and returns one
small row per request. Each scope adds one ``cleanup`` task run, a progress and a table
artifact. 10,000 requests at the default make ~200 lane task runs; raise
``FALFLOW_LIMITS__JOBS_PER_TASK_RUN`` for fewer. Concurrency is bounded by the runtime
(``limits.max_in_flight`` requests in flight), not by lanes.

Limits: requests reach a lane in-process, so a lane's task-run parameters are only its step and
number (the requests are in the ledger and the table artifact), ``lane_task`` runs only inside a
scope, and lanes are never retried by Prefect (``run_job`` retries what is transient and resumes
from the ledger).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from pydantic import BaseModel

from flows.events import RunCounts, emit_run_finished
from flows.paths import PathSegment, get_path, parse_path
from settings import RetentionOverride, RetentionPolicy, Settings, apply_override, load_settings
from tasks.cleanup import CleanupReport, cleanup_task
from tasks.jobs import JobFailed, JobOutcome, run_job
from tasks.models import Job, JobRecord, JobState, safe_segment
from tasks.report import batch_summary, publish_table
from tasks.runtime import Runtime, new_run_key, open_runtime, run_logger

LANE_IDLE_SECONDS = 1.0
"""How long a lane with nothing in flight waits for another request before its task run ends."""

P = ParamSpec("P")
R = TypeVar("R")

_SCOPE: ContextVar[RetentionScope | None] = ContextVar("falflow_scope", default=None)
_WATCHERS: ContextVar[RunProgress | None] = ContextVar("falflow_progress", default=None)


class UpstreamFailed(RuntimeError):
    """A step was not run because a step it refers to failed."""


class StepsFailed(RuntimeError):
    """Raised when a scope ends with failed steps nobody awaited (after cleanup)."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        super().__init__(summary.problem_text())


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """A finished, archived request."""

    name: str
    job_id: str
    record: JobRecord
    output: dict[str, Any]
    """fal's output JSON with fal's URLs (valid until the scope's cleanup)."""

    def get(self, path: str) -> Any:
        """The output value at ``path`` (``images[0].url``)."""
        return get_path(self.output, parse_path(path))


class Step:
    """A ``generate()`` call in flight. ``await step`` gives its :class:`StepResult`."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self._done = anyio.Event()
        self._result: StepResult | None = None
        self._error: BaseException | None = None
        self._observed = False

    def __await__(self) -> Generator[Any, None, StepResult]:
        return self.result().__await__()

    async def result(self) -> StepResult:
        """Wait for the step; raises what made it fail (``JobFailed``, ``UpstreamFailed``, ...)."""
        await self._done.wait()
        self._observed = True
        if self._result is None:
            raise self._error or RuntimeError(f"step {self.name!r} was cancelled")
        return self._result

    def ref(self, path: str = "") -> Ref:
        """A placeholder for the value at ``path`` of this step's output."""
        return Ref(self, parse_path(path))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, result: StepResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._done.set()


@dataclass(frozen=True)
class Ref:
    """Where a later step's argument comes from: ``path`` in ``step``'s output."""

    step: Step
    path: tuple[PathSegment, ...]


def ref(step: Step, path: str = "") -> Ref:
    """``ref(image, "images[0].url")``: the argument waits for ``image`` and takes that value."""
    return step.ref(path)


@dataclass
class RunProgress:
    """Live counters of a scope's requests (the CLI draws them; read-only for others)."""

    planned: int = 0
    """Requests known so far (a fan-out over an earlier step's output adds to it when known)."""
    started: int = 0
    archived: int = 0
    failed: int = 0
    skipped: int = 0
    archived_bytes: int = 0
    phase: str = "starting"
    run_key: str = ""

    @property
    def finished(self) -> int:
        return self.archived + self.failed + self.skipped


@contextmanager
def watching(progress: RunProgress) -> Iterator[RunProgress]:
    """Scopes opened inside this block (in this task, or flows it calls) count into ``progress``."""
    token = _WATCHERS.set(progress)
    try:
        yield progress
    finally:
        _WATCHERS.reset(token)


class Problem(BaseModel):
    """One request or step that did not end archived-and-deleted, and why."""

    job: str
    endpoint: str = ""
    state: str
    request_id: str | None = None
    error: str = ""


class RunSummary(BaseModel):
    """What a scope did: shown by the CLI, returned by ``run_pipeline``; never holds a secret."""

    run_key: str
    bucket: str
    """The bucket URL; the run's files are under ``runs/<run_key>/``, its ledger ``ledger/<run_key>/``."""
    requests: int
    """Requests fal accepted."""
    archived: int
    archived_files: int
    archived_bytes: int
    deleted: int
    """Requests whose payloads and output files are gone from fal."""
    failed: list[Problem]
    """Requests fal answered with an error, or that could not be made."""
    skipped: list[Problem]
    """Steps (or fan-out items) not run because something they refer to failed."""
    unverified: list[Problem]
    """Requests fal holds whose archive is not verified: never deleted, left to the lifecycle TTL."""
    not_deleted: list[Problem]
    """Verified archives whose deletion on fal failed (the janitor retries them)."""
    kept_for_resume: list[Problem] = []
    """Verified archives a cancelled run left on fal because an unfinished step reads them:
    re-running with the same run key deletes them at its end (else the janitor does)."""
    ok: bool
    """Nothing failed, skipped or left on fal (unverified archives count unless
    ``retention.allow_unverified``)."""

    def problem_text(self) -> str:
        lines = [f"falflow run {self.run_key}: not everything went through:"]
        for title, items in (
            ("failed", self.failed),
            ("skipped", self.skipped),
            ("left on fal, archive not verified", self.unverified),
            ("archived but not deleted from fal", self.not_deleted),
            ("kept on fal for the resumed run", self.kept_for_resume),
        ):
            for item in items[:20]:
                request = f" request {item.request_id}" if item.request_id else ""
                lines.append(f"  {title}: {item.job}{request} {item.error}".rstrip())
            if len(items) > 20:
                lines.append(f"  ... and {len(items) - 20} more {title}")
        return "\n".join(lines)


# --- the scope -----------------------------------------------------------------------------------


@dataclass
class _Pending:
    job: Job
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: JobOutcome | None = None
    error: BaseException | None = None

    async def wait(self) -> JobOutcome:
        await self.done.wait()
        if self.outcome is None:
            raise self.error or RuntimeError(f"request {self.job.job_id} was cancelled")
        return self.outcome


class _Lane:
    """Up to ``capacity`` requests of one step, run concurrently inside one Prefect task run."""

    def __init__(self, scope: RetentionScope, group: str, number: int, capacity: int) -> None:
        self.scope, self.group, self.number, self.capacity = scope, group, number, capacity
        self.send, self.receive = anyio.create_memory_object_stream[_Pending](math.inf)
        self.taken = 0
        self.in_flight = 0
        self.accepting = True
        self.idle_since = anyio.current_time()
        self.rows: list[dict[str, str | None]] = []
        self.failures = 0
        self._wait: anyio.CancelScope | None = None

    def offer(self, pending: _Pending) -> bool:
        if not self.accepting:
            return False
        self.taken += 1
        self.accepting = self.taken < self.capacity
        self.send.send_nowait(pending)
        return True

    def wake(self) -> None:
        if self._wait is not None:
            self._wait.cancel()

    async def serve(self) -> list[dict[str, str | None]]:
        async with anyio.create_task_group() as tg:
            while True:
                buffered = self.receive.statistics().current_buffer_used
                if not buffered and not self.accepting:
                    break
                deadline = math.inf
                if not buffered and not self.in_flight:
                    idle = 0.0 if self.scope.closing else LANE_IDLE_SECONDS
                    deadline = self.idle_since + idle
                    if anyio.current_time() >= deadline:
                        self.accepting = False
                        continue
                with anyio.CancelScope(deadline=deadline) as self._wait:
                    pending = await self.receive.receive()
                    self.in_flight += 1
                    tg.start_soon(self._one, pending)
                self._wait = None
        return self.rows

    def abandon(self, error: BaseException) -> None:
        """Fail whatever this lane took and never ran (its task run could not start)."""
        self.accepting = False
        while True:
            try:
                pending = self.receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return
            pending.error = error
            pending.done.set()

    async def _one(self, pending: _Pending) -> None:
        try:
            pending.outcome = await run_job(self.scope.runtime, pending.job)
            self.scope.note(pending.outcome.record)
            if not pending.outcome.record.verified:
                self.failures += 1  # its output is usable, but fal's copy stays: reported
        except JobFailed as exc:
            pending.error = exc
            self.failures += 1
            self.scope.note(exc.record)
        except Exception as exc:
            # Anything else (an archive that cannot be written, a bug) fails this request only;
            # its ledger record, if any, is read back before cleanup.
            pending.error = exc
            self.failures += 1
            self.scope.note_unknown(pending.job, exc)
        finally:
            record = self.scope.records.get(pending.job.job_id)
            self.rows.append(
                {
                    "job": pending.job.job_id,
                    "request": record.request_id if record else None,
                    "state": record.state.value if record else "error",
                }
            )
            self.in_flight -= 1
            if not self.in_flight:
                self.idle_since = anyio.current_time()
                self.wake()
            pending.done.set()
            await self.scope.finished(pending)


class LaneFailed(RuntimeError):
    """Some requests of a lane failed; the flow reports them, their siblings are unaffected."""


@task(name="falflow-jobs", task_run_name="{group} #{lane}", cache_policy=NO_CACHE, retries=0)
async def lane_task(group: str, lane: int) -> list[dict[str, str | None]]:
    """Run one lane of the current scope (the requests arrive in-process as they become ready)."""
    scope = current_scope()
    served = scope.lane(group, lane)
    rows = await served.serve()
    records = [scope.records[row["job"]] for row in rows if row["job"] in scope.records]
    run_logger().info("%s #%d: %s", group, lane, batch_summary(len(rows), records))
    if served.failures:
        raise LaneFailed(f"{served.failures} of {len(rows)} requests of {group} #{lane} failed")
    return rows


class RetentionScope:
    """One run's requests: lanes, records, progress; cleaned up when the scope ends."""

    def __init__(self, runtime: Runtime, progress: RunProgress) -> None:
        self.runtime = runtime
        self.progress = progress
        self.records: dict[str, JobRecord] = {}
        self.errors: dict[str, tuple[Job, BaseException]] = {}
        self.skipped: list[Problem] = []
        self.closing = False
        self.cancelled = False
        self.summary: RunSummary | None = None
        self._still_read: Callable[[], Iterable[str]] = lambda: self._job_ids
        self._tg: TaskGroup | None = None
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._open_lane: dict[str, _Lane] = {}
        self._job_ids: set[str] = set()
        self._content_ids: dict[str, int] = {}
        self._steps: list[Step] = []
        self._artifact = runtime.progress

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def run_key(self) -> str:
        return self.runtime.run_key

    def policy_for(self, endpoint: str, retention: RetentionOverride | None) -> RetentionPolicy:
        policy = self.settings.retention.policy_for(endpoint)
        return policy if retention is None else apply_override(policy, retention)

    def attach(self, tg: TaskGroup) -> None:
        """The task group lanes and steps run in (the scope's own)."""
        self._tg = tg

    def _start(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("this retention scope is not open: call generate() inside it")
        self._tg.start_soon(func, *args)

    # -- requests

    async def plan(self, count: int) -> None:
        """``count`` more requests will be made (for the progress bar and artifact)."""
        self.progress.planned += count
        await self._quietly(self._artifact.expect(count))

    async def run(self, job: Job, *, group: str) -> JobOutcome:
        """Make one request in ``group``'s current lane; raises ``JobFailed`` on a fal error."""
        if job.job_id in self._job_ids:
            raise ValueError(f"job id {job.job_id!r} is used twice in run {self.run_key}")
        self._job_ids.add(job.job_id)
        pending = _Pending(job)
        lane = self._open_lane.get(group)
        if lane is None or not lane.offer(pending):
            number = sum(1 for g, _ in self._lanes if g == group) + 1
            lane = _Lane(self, group, number, self.settings.limits.jobs_per_task_run)
            lane.offer(pending)
            self._lanes[(group, number)] = lane
            self._open_lane[group] = lane
            self._start(self._run_lane, lane)
        self.progress.started += 1
        return await pending.wait()

    @property
    def task_runs(self) -> int:
        """Prefect task runs this scope has made: one per lane, plus its cleanup once it ran."""
        return len(self._lanes) + (self.summary is not None)

    def lane(self, group: str, number: int) -> _Lane:
        return self._lanes[(group, number)]

    async def _run_lane(self, lane: _Lane) -> None:
        try:
            await lane_task(lane.group, lane.number)
        except LaneFailed:
            pass  # each failed request is reported through its own step
        except Exception as exc:
            lane.abandon(exc)  # the task run could not run: its requests fail, the scope goes on

    def note(self, record: JobRecord) -> None:
        self.records[record.job_id] = record

    def note_unknown(self, job: Job, error: BaseException) -> None:
        self.errors[job.job_id] = (job, error)

    async def note_skipped(self, job: str, endpoint: str, reason: str) -> None:
        """A planned request that will not be made (what it needs failed)."""
        self.skipped.append(Problem(job=job, endpoint=endpoint, state="skipped", error=reason))
        self.progress.skipped += 1
        await self._quietly(self._artifact.finished())

    async def finished(self, pending: _Pending) -> None:
        if pending.outcome is not None and pending.outcome.record.verified:
            self.progress.archived += 1
            self.progress.archived_bytes += pending.outcome.record.archived_bytes
        else:
            self.progress.failed += 1
        await self._quietly(self._artifact.finished())

    async def _quietly(self, update: Awaitable[None]) -> None:
        """Artifacts are for people watching: a Prefect API hiccup must not fail requests."""
        try:
            await update
        except Exception as exc:
            run_logger().warning("run %s: an artifact was not updated: %s", self.run_key, exc)

    # -- the Python API

    def generate(
        self,
        endpoint: str,
        arguments: Mapping[str, Any],
        *,
        retention: RetentionOverride | None = None,
        name: str | None = None,
    ) -> Step:
        if self.closing:
            raise RuntimeError("this retention scope has ended: call generate() inside it")
        step = Step(name or endpoint, endpoint)
        self._steps.append(step)
        self._start(self._generate, step, dict(arguments), retention)
        return step

    async def _generate(
        self, step: Step, arguments: dict[str, Any], retention: RetentionOverride | None
    ) -> None:
        await self.plan(1)
        try:
            resolved = await _resolve_refs(arguments)
            job = Job(
                job_id=self._content_id(step, resolved),
                endpoint=step.endpoint,
                arguments=resolved,
                policy=self.policy_for(step.endpoint, retention),
            )
        except Exception as exc:
            await self.note_skipped(f"{step.name} ({step.endpoint})", step.endpoint, str(exc))
            step._finish(None, exc)
            return
        try:
            outcome = await self.run(job, group=step.name)
        except BaseException as exc:
            step._finish(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        step._finish(StepResult(step.name, job.job_id, outcome.record, outcome.output or {}), None)

    def _content_id(self, step: Step, arguments: dict[str, Any]) -> str:
        """Same step, endpoint and arguments → same job id, so a re-run resumes from the ledger."""
        try:
            canonical = json.dumps([step.endpoint, arguments], sort_keys=True)
        except TypeError as exc:
            raise TypeError(f"arguments of {step.name!r} must be JSON values: {exc}") from None
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        seen = self._content_ids.get(digest, 0)
        self._content_ids[digest] = seen + 1
        return Job.make_id(self.run_key, step.name, f"{digest}-{seen}" if seen else digest)

    def unobserved_failures(self) -> list[Step]:
        return [s for s in self._steps if s.done and s._result is None and not s._observed]

    # -- the end

    def keep_if_cancelled(self, still_read: Callable[[], Iterable[str]]) -> None:
        """Job ids a cancelled run keeps on fal because an unfinished step may still read their
        URLs once resumed (default: every job, as a Python flow's later steps are unknown)."""
        self._still_read = still_read

    def close(self) -> None:
        """No more requests: lanes with nothing in flight end now, the others when they drain."""
        self.closing = True
        for lane in self._open_lane.values():
            lane.wake()

    async def clean(self) -> RunSummary:
        """The cleanup task run, once every step has finished; then the table, summary and event."""
        self.progress.phase = "cleanup"
        kept = set(self._still_read()) & self._job_ids if self.cancelled else set()
        cleaned = await cleanup_task(sorted(self._job_ids - kept))
        for job_id in sorted(kept):
            record = await self.runtime.ledger.get(self.run_key, job_id)
            if record is not None:
                cleaned.records.append(record)
        await self._quietly(publish_table(self.run_key, cleaned.records))
        self.summary = self._summarise(cleaned, kept)
        emit_run_finished(
            self.run_key,
            RunCounts.of(cleaned.records),
            flow=_flow_name(),
            status="completed" if self.summary.ok else "failed",
        )
        self.progress.phase = "done"
        return self.summary

    def _summarise(self, cleaned: CleanupReport, kept: set[str]) -> RunSummary:
        def problem(record: JobRecord, error: str | None = None) -> Problem:
            return Problem(
                job=record.job_id,
                endpoint=record.endpoint,
                state=record.state.value,
                request_id=record.request_id,
                error=error or f"{record.error_type or ''} {record.error or ''}".strip(),
            )

        records = {r.job_id: r for r in cleaned.records}
        failed = [problem(r) for r in records.values() if r.state is JobState.FAILED]
        failed += [
            Problem(
                job=job.job_id,
                endpoint=job.endpoint,
                state=records[job.job_id].state.value if job.job_id in records else "not started",
                error=self.runtime.redact(_one_line(error)),
            )
            for job, error in self.errors.values()
            if job.job_id not in records or records[job.job_id].state is JobState.PENDING
        ]
        unverified = [
            problem(r)
            for r in records.values()
            if r.state in (JobState.SUBMITTED, JobState.SUBMIT_UNKNOWN, JobState.COMPLETED)
        ]
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
        allow_unverified = self.settings.retention.allow_unverified
        verified = [r for r in records.values() if r.verified]
        return RunSummary(
            run_key=self.run_key,
            bucket=self.runtime.bucket.url,
            requests=sum(r.request_id is not None for r in records.values()),
            archived=len(verified),
            archived_files=sum(len(r.objects) for r in verified),
            archived_bytes=sum(r.archived_bytes for r in verified),
            deleted=len(cleaned.deleted),
            failed=failed,
            skipped=list(self.skipped),
            unverified=unverified,
            not_deleted=not_deleted,
            kept_for_resume=for_resume,
            ok=not (
                failed
                or self.skipped
                or not_deleted
                or for_resume
                or (unverified and not allow_unverified)
            ),
        )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


async def _resolve_refs(value: Any) -> Any:
    if isinstance(value, Ref):
        try:
            result = await value.step.result()
        except Exception as exc:
            raise UpstreamFailed(f"step {value.step.name!r} it refers to failed: {exc}") from exc
        try:
            return get_path(result.output, value.path)
        except LookupError as exc:
            raise UpstreamFailed(f"step {value.step.name!r}: {exc}") from None
    if isinstance(value, Step):
        raise TypeError(
            f"pass ref(step) or ref(step, 'path') for step {value.name!r}, not the step itself"
        )
    if isinstance(value, dict):
        return {key: await _resolve_refs(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [await _resolve_refs(item) for item in value]
    return value


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
    settings: Settings | None = None, run_key: str | None = None
) -> AsyncIterator[RetentionScope]:
    """Open the run's runtime; on exit wait for every step, then clean up (also on error).

    Raises:
        settings.SettingsError: the configuration is invalid (nothing was submitted).
        StepsFailed: a step failed and the body never awaited it (raised after cleanup).
    """
    settings = settings or load_settings()
    run_key = run_key or default_run_key(_flow_name())
    progress = _WATCHERS.get() or RunProgress()
    progress.run_key, progress.phase = run_key, "running"
    body_error: BaseException | None = None
    async with open_runtime(settings, run_key) as runtime:
        scope = RetentionScope(runtime, progress)
        token = _SCOPE.set(scope)
        try:
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
        raise StepsFailed(scope.summary)


def _flow_name() -> str:
    context = FlowRunContext.get()
    return context.flow.name if context is not None and context.flow is not None else "falflow"


def retained(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Run an async flow body inside a :func:`retention_scope` (settings from the environment)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        async with retention_scope():
            return await fn(*args, **kwargs)

    return wrapper


def generate(
    endpoint: str,
    arguments: Mapping[str, Any],
    *,
    retention: RetentionOverride | None = None,
    name: str | None = None,
) -> Step:
    """Start one fal request in the current retention scope; ``await`` the result for its output.

    ``arguments`` may hold ``ref(step, "path")`` values anywhere: the request waits for those
    steps. ``retention`` overrides the endpoint's policy for this request; ``name`` groups
    requests into lanes and names their task runs (default: the endpoint).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", endpoint):
        raise ValueError(f"endpoint must look like owner/model[/path] (got {endpoint!r})")
    return current_scope().generate(endpoint, arguments, retention=retention, name=name)


__all__ = [
    "LANE_IDLE_SECONDS",
    "Problem",
    "Ref",
    "RetentionScope",
    "RunProgress",
    "RunSummary",
    "Step",
    "StepResult",
    "StepsFailed",
    "UpstreamFailed",
    "current_scope",
    "generate",
    "lane_task",
    "ref",
    "retained",
    "retention_scope",
    "watching",
]
