"""Running a :class:`Pipeline` inside a retention scope: each step as soon as what it needs is done."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from falflow.flows.scope import RetentionScope
from falflow.flows.spec.compiler import (
    Pipeline,
    PlannedStep,
    _describe,
    _label,
)
from falflow.flows.spec.schema import (
    RenderError,
)
from falflow.flows.spec.templates import (
    Context,
    render,
)
from falflow.tasks.models import Job, job_id_for


@dataclass
class _StepRun:
    """A step while it runs: its items appear once known; each item has an output or a reason."""

    planned: PlannedStep
    known: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    item_done: list[anyio.Event] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    broken: dict[int, str] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)
    """Items that finished for good (archived, failed or skipped), not cut short by cancellation."""
    job_ids: dict[int, str] = field(default_factory=dict)
    item_readers: int = 0
    """Steps that read this one item by item (``for_each: "{{ steps.NAME }}"``)."""
    whole_readers: int = 0
    """Steps that read all of this one (any other reference): each holds every item."""
    unread: list[int] = field(default_factory=list)
    """Per item: readers not done with it yet."""

    def start(self, count: int) -> None:
        self.item_done = [anyio.Event() for _ in range(count)]
        self.outputs = [None] * count
        self.unread = [self.item_readers + self.whole_readers] * count
        self.known.set()

    def read(self, index: int, scope: RetentionScope) -> None:
        """One reader is done with item ``index``: its fal copy and its output are let go once
        no reader is left (the output stays in the bucket)."""
        job_id = self.job_ids.get(index)
        if job_id is not None:
            scope.release(job_id)
        self.unread[index] -= 1
        if self.unread[index] <= 0:
            self.outputs[index] = None

    @property
    def count(self) -> int:
        return len(self.item_done)

    @property
    def value(self) -> Any:
        """What ``{{ steps.NAME }}`` means: the output, or the list of outputs of a fan-out."""
        return self.outputs if self.planned.fans_out else self.outputs[0]

    def label(self, index: int) -> str:
        return f"{self.planned.name}[{index}]" if self.planned.fans_out else self.planned.name


async def execute(pipeline: Pipeline, params: Mapping[str, Any], scope: RetentionScope) -> None:
    """Run every step as soon as what it needs is done; failures stay with their items.

    A failed item makes the items that follow it (``for_each: "{{ steps.it }}"``) and the steps
    that need the whole step skipped; every other item goes on. Cleanup is the scope's.
    """
    runs = {step.name: _StepRun(step) for step in pipeline.steps}
    for step in pipeline.steps:
        for name in step.needs:
            runs[name].whole_readers += 1
        if step.chain is not None:
            runs[step.chain].item_readers += 1
    scope.keep_if_cancelled(lambda: _still_read(runs))
    async with anyio.create_task_group() as tg:
        for run in runs.values():
            tg.start_soon(_run_step, run, runs, params, scope)


def _still_read(runs: Mapping[str, _StepRun]) -> set[str]:
    """Requests whose fal URLs a step that has not finished may still read (kept on fal when the
    run is cancelled, so the resumed run can read them)."""
    needed: set[str] = set()
    for reader in runs.values():
        finished = reader.known.is_set() and len(reader.settled) == reader.count
        for name in reader.planned.needs:
            if not finished:
                needed.update(runs[name].job_ids.values())
        if reader.planned.chain is not None:
            for index, job_id in runs[reader.planned.chain].job_ids.items():
                if not reader.known.is_set() or index not in reader.settled:
                    needed.add(job_id)
    return needed


async def _run_step(
    run: _StepRun, runs: Mapping[str, _StepRun], params: Mapping[str, Any], scope: RetentionScope
) -> None:
    step = run.planned
    try:
        for name in sorted(step.needs):
            await runs[name].done.wait()
        source = runs[step.chain] if step.chain else None
        if source is not None:
            await source.known.wait()
        broken_needs = [name for name in sorted(step.needs) if runs[name].broken]
        ctx = Context(params, {name: runs[name].value for name in step.needs})
        items: list[Any] | None = None
        reason = ""
        if broken_needs:
            reason = f"not run: it needs all of {', '.join(broken_needs)}, and some of it failed"
        elif source is None and step.for_each is None:
            items = [None]
        elif source is None:
            try:
                items = render(step.for_each, ctx, "for_each")
            except RenderError as exc:
                reason = f"not run: {exc}"
            if items is not None and not isinstance(items, list):
                reason = f"not run: for_each {_label(step.for_each)} is {_describe(items)}"
                items = None
        if items is None and source is None:
            run.start(1 if reason else 0)
        else:
            run.start(source.count if source is not None else len(items or []))
        await scope.plan(run.count)
        if reason:
            for index in range(run.count):
                run.broken[index] = reason
                await scope.note_skipped(step.name, run.label(index), step.spec.endpoint, reason)
                run.settled.add(index)
                run.item_done[index].set()
                if source is not None:
                    source.read(index, scope)
        else:
            async with anyio.create_task_group() as tg:
                for index in range(run.count):
                    item = None if items is None else items[index]
                    tg.start_soon(_run_item, run, index, item, source, ctx, scope)
    finally:
        run.done.set()
    # Not reached when cancelled: a resumed run's items may still read what this step needs.
    for name in step.needs:
        for index in range(runs[name].count):
            runs[name].read(index, scope)


async def _run_item(
    run: _StepRun,
    index: int,
    item: Any,
    source: _StepRun | None,
    ctx: Context,
    scope: RetentionScope,
) -> None:
    try:
        await _item(run, index, item, source, ctx, scope)
        run.settled.add(index)  # not reached when cancelled
    finally:
        run.item_done[index].set()
    if source is not None:  # this item is done with the item it followed
        source.read(index, scope)


async def _item(
    run: _StepRun,
    index: int,
    item: Any,
    source: _StepRun | None,
    ctx: Context,
    scope: RetentionScope,
) -> None:
    step = run.planned
    if source is not None:
        await source.item_done[index].wait()
        if index in source.broken or index not in source.settled:
            run.broken[index] = f"not run: {source.label(index)} did not finish"
            await scope.note_skipped(
                step.name, run.label(index), step.spec.endpoint, run.broken[index]
            )
            return
        item = source.outputs[index]
    try:
        arguments = render(step.arguments, Context(ctx.params, ctx.steps, item, index), "arguments")
    except RenderError as exc:
        run.broken[index] = f"not run: {exc}"
        await scope.note_skipped(step.name, run.label(index), step.spec.endpoint, run.broken[index])
        return
    # The arguments are part of the id: a re-run with the same run key resumes what it recorded,
    # and a changed request (other parameters) is a new request, not a stale resumed one.
    endpoint = step.spec.endpoint
    try:
        policy = scope.policy_for(endpoint, step.spec.retention)
    except ValueError as exc:  # a retention override that would keep outputs on fal forever
        run.broken[index] = f"not run: step '{step.name}', field 'retention': {exc}"
        await scope.note_skipped(step.name, run.label(index), endpoint, run.broken[index])
        return
    job = Job(
        job_id=job_id_for(scope.run_key, step.name, endpoint, arguments, item=index),
        endpoint=endpoint,
        arguments=arguments,
        policy=policy,
    )
    run.job_ids[index] = job.job_id
    scope.hold(job.job_id, run.item_readers + run.whole_readers)
    try:
        outcome = await scope.run(job, group=step.name, label=run.label(index))
        if outcome.output is None:  # fal's output was refused (recorded): nothing to read
            run.broken[index] = outcome.record.error or "its output was refused"
        if run.unread[index] > 0:  # kept in memory only while a reader may need it
            run.outputs[index] = outcome.output
    except Exception as exc:  # the scope has the record; siblings go on
        run.broken[index] = str(exc)
