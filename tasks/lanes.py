"""Lanes: a step's requests batched into Prefect task runs, not one task run each.

The OSS Prefect server loses task runs past ~5,000 queued events and each task run costs
5–12 ms, so one task run per fal request does not scale to thousands. Instead each step feeds
its requests to a lane: one Prefect task run ``falflow-jobs`` named ``<step> #<n>`` that takes up
to ``limits.jobs_per_task_run`` requests (default 50) as they become ready and runs them
concurrently (submit → wait → archive, :func:`~falflow.tasks.jobs.run_job`). A lane stops taking
requests when it is full, or when it has nothing in flight for :data:`LANE_IDLE_SECONDS`; the
next request opens a new lane. So a request never waits for a lane, and item i of a chain never
waits for item j. A lane ends ``Failed`` when any of its requests failed or could not be
verified (its siblings are unaffected) and returns one small row per request. Each failed request
logs one WARNING line at its lane with fal's error type and message; the lane's Failed state
says the same in one line (no traceback: a model refusing a prompt is not a bug).

Requests reach a lane in-process, so a lane's task-run parameters are only its step and number,
:func:`lane_task` runs only inside :func:`serving`, and lanes are never retried by Prefect
(``run_job`` retries what is transient and resumes from the ledger). Whoever owns the lanes (a
retention scope) is a :class:`LaneHost`: it learns of every record and finished request.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import anyio
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Failed

from falflow.tasks.errors import JobFailed
from falflow.tasks.jobs import JobOutcome, run_job
from falflow.tasks.models import Job, JobRecord
from falflow.tasks.report import batch_summary
from falflow.tasks.runtime import Runtime, run_logger

MAX_PROBLEM_CHARS = 500
"""An unexpected error's text in a lane's log line and state (an error may be huge)."""
LANE_IDLE_SECONDS = 1.0
"""How long a lane with nothing in flight waits for another request before its task run ends."""

Row = dict[str, str | None]

_LANES: ContextVar[Lanes | None] = ContextVar("falflow_lanes", default=None)


class LaneHost(Protocol):
    """What lanes need from their owner."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def closing(self) -> bool:
        """No more requests will come: idle lanes end at once."""
        ...

    def note_unknown(self, job: Job, error: BaseException) -> None:
        """A request stopped on an unexpected error (no usable record)."""

    async def finished(self, outcome: JobOutcome | None) -> None:
        """A request ended: archived (verified or not), or failed when ``outcome`` is None."""


@dataclass
class LaneRequest:
    """One request handed to a lane, and how it ended."""

    job: Job
    label: str
    """How the run page names it (``image[2]``)."""
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: JobOutcome | None = None
    error: BaseException | None = None
    record: JobRecord | None = None
    """Its ledger record as it ended (None: it stopped before it had a usable one)."""

    async def wait(self) -> JobOutcome:
        await self.done.wait()
        if self.outcome is None:
            raise self.error or RuntimeError(f"request {self.job.job_id} was cancelled")
        return self.outcome


class Lane:
    """Up to ``capacity`` requests of one step, run concurrently inside one Prefect task run."""

    def __init__(self, host: LaneHost, group: str, number: int, capacity: int) -> None:
        self.host, self.group, self.number, self.capacity = host, group, number, capacity
        self.send, self.receive = anyio.create_memory_object_stream[LaneRequest](math.inf)
        self.taken = 0
        self.in_flight = 0
        self.accepting = True
        self.idle_since = anyio.current_time()
        self.rows: list[Row] = []
        self.records: list[JobRecord] = []
        self.failures: list[str] = []
        """One line per request that failed or could not be verified."""
        self._wait: anyio.CancelScope | None = None

    def offer(self, request: LaneRequest) -> bool:
        if not self.accepting:
            return False
        self.taken += 1
        self.accepting = self.taken < self.capacity
        self.send.send_nowait(request)
        return True

    def wake(self) -> None:
        if self._wait is not None:
            self._wait.cancel()

    async def serve(self) -> list[Row]:
        async with anyio.create_task_group() as tg:
            while True:
                buffered = self.receive.statistics().current_buffer_used
                if not buffered and not self.accepting:
                    break
                deadline = math.inf
                if not buffered and not self.in_flight:
                    idle = 0.0 if self.host.closing else LANE_IDLE_SECONDS
                    deadline = self.idle_since + idle
                    if anyio.current_time() >= deadline:
                        self.accepting = False
                        continue
                with anyio.CancelScope(deadline=deadline) as self._wait:
                    request = await self.receive.receive()
                    self.in_flight += 1
                    tg.start_soon(self._one, request)
                self._wait = None
        return self.rows

    def abandon(self, error: BaseException) -> None:
        """Fail whatever this lane took and never ran (its task run could not start)."""
        self.accepting = False
        while True:
            try:
                request = self.receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return
            request.error = error
            request.done.set()

    async def _one(self, request: LaneRequest) -> None:
        problem = ""
        try:
            request.outcome = await run_job(self.host.runtime, request.job)
            request.record = request.outcome.record
            if not request.outcome.record.verified:
                # its output is usable, but fal's copy stays: reported (archive.py logged why)
                self.failures.append(f"{request.label}: not verified")
        except JobFailed as exc:
            request.error = exc
            request.record = failed = exc.record
            where = f" {failed.request_id}" if failed.request_id else ""
            problem = f"{failed.error_type or 'error'}: {failed.error or 'no details'}"
            run_logger().warning("%s: fal request%s failed: %s", request.label, where, problem)
        except Exception as exc:
            # Anything else (an archive that cannot be written, a bug) fails this request only;
            # its ledger record, if any, is read back before cleanup.
            request.error = exc
            self.host.note_unknown(request.job, exc)
            text = " ".join(str(exc).split())
            problem = self.host.runtime.redact(text)[:MAX_PROBLEM_CHARS] or type(exc).__name__
            run_logger().warning("%s: failed: %s", request.label, problem)
        finally:
            if problem:
                self.failures.append(f"{request.label}: {problem}")
            record = request.record
            if record is not None:
                self.records.append(record)
            self.rows.append(
                {
                    "job": request.job.job_id,
                    "request": record.request_id if record else None,
                    "state": record.state.value if record else "error",
                }
            )
            self.in_flight -= 1
            if not self.in_flight:
                self.idle_since = anyio.current_time()
                self.wake()
            request.done.set()
            await self.host.finished(request.outcome)


class Lanes:
    """The lanes of one scope: each request joins its group's open lane, or opens the next."""

    def __init__(
        self,
        host: LaneHost,
        capacity: int,
        start: Callable[[Callable[..., Coroutine[Any, Any, None]], Lane], None],
    ) -> None:
        self._host, self._capacity, self._start = host, capacity, start
        self._lanes: dict[tuple[str, int], Lane] = {}
        """Lanes whose task run has not ended (a finished one is forgotten with its rows)."""
        self._open: dict[str, Lane] = {}
        self._numbers: dict[str, int] = {}
        self.started = 0
        """Lanes (task runs) started so far."""

    def __len__(self) -> int:
        return self.started

    async def run(self, job: Job, *, group: str, label: str) -> JobOutcome:
        """Make one request (``label`` on the run page) in ``group``'s current lane; raises
        ``JobFailed`` on a fal error."""
        request = LaneRequest(job, label)
        lane = self._open.get(group)
        if lane is None or not lane.offer(request):
            number = self._numbers[group] = self._numbers.get(group, 0) + 1
            lane = Lane(self._host, group, number, self._capacity)
            lane.offer(request)
            self._lanes[(group, number)] = lane
            self._open[group] = lane
            self.started += 1
            self._start(self._run_lane, lane)
        return await request.wait()

    def lane(self, group: str, number: int) -> Lane:
        return self._lanes[(group, number)]

    async def _run_lane(self, lane: Lane) -> None:
        try:
            await _run_lane(lane)
        finally:
            del self._lanes[(lane.group, lane.number)]
            if self._open.get(lane.group) is lane:
                del self._open[lane.group]

    def wake(self) -> None:
        """Let open lanes with nothing in flight end now (the host is closing)."""
        for lane in self._open.values():
            lane.wake()


@contextmanager
def serving(lanes: Lanes) -> Iterator[Lanes]:
    """:func:`lane_task` runs awaited inside this block find their lane in ``lanes``."""
    token = _LANES.set(lanes)
    try:
        yield lanes
    finally:
        _LANES.reset(token)


async def _run_lane(lane: Lane) -> None:
    try:
        # A lane whose requests failed is Failed, and each failure is reported through its own
        # step; whatever else stopped the task run fails the requests it never ran.
        # (Prefect types an async task's return_state call as a State; it is awaitable)
        called = lane_task(lane.group, lane.number, return_state=True)
        state = await cast("Awaitable[State[Any]]", called)
        if not state.is_completed():
            lane.abandon(RuntimeError(state.message or f"lane {lane.group} #{lane.number} failed"))
    except Exception as exc:
        lane.abandon(exc)  # the task run could not run: its requests fail, the scope goes on


@task(name="falflow-jobs", task_run_name="{group} #{lane}", cache_policy=NO_CACHE, retries=0)
async def lane_task(group: str, lane: int) -> list[Row] | State[list[Row]]:
    """Run one lane (the requests arrive in-process as they become ready); Failed, with one line
    naming the failures, when any request failed or could not be verified."""
    lanes = _LANES.get()
    if lanes is None:
        raise RuntimeError("lane_task runs only inside a retention scope's lanes")
    served = lanes.lane(group, lane)
    rows = await served.serve()
    run_logger().info("%s #%d: %s", group, lane, batch_summary(len(rows), served.records))
    if served.failures:
        first = served.failures[0]
        more = f" (and {len(served.failures) - 1} more)" if len(served.failures) > 1 else ""
        # (Prefect logs the Failed state at ERROR once more; a raised error would add a traceback)
        return Failed(
            message=f"{len(served.failures)} of {len(rows)} requests failed: {first}{more}"
        )
    return rows
