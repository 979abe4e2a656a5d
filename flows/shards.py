"""Sharded runs: one big batch split into shards, each a flow run of its own with its own run key.

A spec's fanned-out steps all follow one list of items (``for_each: "{{ params.prompts }}"`` or a
list written in the spec, and the steps that chain on them item by item). :func:`plan_shards`
cuts that list into shards of ``shard_size`` items; shard ``i`` is the same pipeline on its
slice, with the run key ``<run key>.shard-<i>`` (one bucket-key segment: its own ledger, lease
and files, so a crashed or retried shard resumes alone). Item ``i`` of every step stays in one
shard: shards never split a chain.

:func:`run_shards` runs them: on the work pool when the parent runs from a deployment (one
child flow run per shard through ``run_deployment``; a shard whose run crashed, or whose lease
expired while Prefect still says Running, is started again and resumes from its ledger), else
in this process one after another. :func:`gather` makes the shards' summaries one report.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.context import FlowRunContext
from prefect.deployments import arun_deployment
from prefect.logging import get_run_logger
from pydantic import ValidationError

from falflow.flows.spec.compiler import Pipeline
from falflow.flows.spec.schema import SpecError
from falflow.flows.spec.templates import Template, _templates
from falflow.flows.summary import Problem, RunFailed, RunSummary
from falflow.settings import RetentionSettings
from falflow.tasks.ledger import shard_run_key
from falflow.tasks.liveness import Lease, lease_key, mark_crashed
from falflow.tasks.lost import LISTING_LAG
from falflow.tasks.models import utcnow
from falflow.tasks.store import Bucket

SHARD_ATTEMPTS = 3
"""Flow runs a shard gets when its run crashes (a lost worker): each resumes from its ledger."""
POLL_SECONDS = 2.0
"""How often the parent reads its shards' states (one API call per 200 of them)."""
_PAGE = 200


@dataclass(frozen=True)
class Shard:
    """One slice of a batch: items ``[start, stop)`` of the list every fanned-out step follows."""

    index: int
    run_key: str
    start: int
    stop: int
    parameters: dict[str, Any]
    """The pipeline's parameters with each split list parameter cut to this shard's slice."""
    lists: dict[str, list[Any]] = field(default_factory=dict)
    """Step name → this shard's slice of the list written in that step's ``for_each``."""

    def spec_for(self, pipeline: Pipeline, spec: str | dict[str, Any]) -> str | dict[str, Any]:
        """What the shard's run gets as ``spec``: the parent's own (a name, a path, text) unless
        a list written in the spec is split; then the spec as a dict with this shard's slices."""
        if not self.lists:
            return spec
        whole = pipeline.spec.model_dump(mode="json", exclude_unset=True)
        for step in whole["steps"]:
            if step["name"] in self.lists:
                step["for_each"] = self.lists[step["name"]]
        return whole


def plan_shards(
    pipeline: Pipeline, params: Mapping[str, Any], shard_size: int, run_key: str
) -> list[Shard]:
    """Cut the batch into shards of at most ``shard_size`` items (``params`` as bound by
    :meth:`Pipeline.bind`). A batch of at most ``shard_size`` items is one shard.

    Raises:
        SpecError: the spec cannot be split (a step that runs once, needs all of another step,
            uses ``{{ index }}``, or lists of different lengths), each problem by step.
        ValueError: ``shard_size`` below 1, or a run key too long for the shard suffix.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1 (got {shard_size})")
    split_params, literal_steps, problems = _split_lists(pipeline)
    lengths = {f"params.{name}": len(params[name]) for name in split_params}
    by_name = {step.name: step for step in pipeline.steps}
    for name in literal_steps:
        written = by_name[name].spec.for_each
        assert isinstance(written, list)
        lengths[f"step '{name}'"] = len(written)
    if len(set(lengths.values())) > 1:
        sizes = ", ".join(f"{what}: {n}" for what, n in lengths.items())
        problems.append(
            f"the fanned-out steps follow lists of different lengths ({sizes}); a shard keeps "
            "item i of every step together, so they must be equally long"
        )
    if problems:
        raise SpecError(
            [f"cannot shard this pipeline: {p}" for p in dict.fromkeys(problems)],
            source=pipeline.source,
        )
    total = next(iter(lengths.values()))
    shards = []
    for index, start in enumerate(range(0, max(total, 1), shard_size)):
        stop = min(start + shard_size, total)
        parameters = dict(params)
        for name in split_params:
            parameters[name] = list(params[name][start:stop])
        lists = {}
        for name in literal_steps:
            written = by_name[name].spec.for_each
            assert isinstance(written, list)
            lists[name] = written[start:stop]
        shards.append(Shard(index, shard_run_key(run_key, index), start, stop, parameters, lists))
    return shards


def _split_lists(pipeline: Pipeline) -> tuple[set[str], list[str], list[str]]:
    """The list parameters and the steps with a written list that the batch splits along, and
    what keeps the spec from being split."""
    params: set[str] = set()
    literal: list[str] = []
    problems: list[str] = []
    split: set[str] = set()  # steps that follow the split list (a shard runs a slice of them)
    for step in pipeline.steps:  # in dependency order: a chain's source comes first
        where = f"step '{step.name}'"
        whole = step.for_each.whole if isinstance(step.for_each, Template) else None
        if step.needs:
            problems.append(
                f"{where} needs all of {', '.join(sorted(step.needs))}; a shard would see only "
                "its own slice"
            )
        elif step.chain is not None:
            if step.chain in split:
                split.add(step.name)
        elif whole is not None and whole.root == "params" and not whole.path:
            assert whole.name is not None
            params.add(whole.name)
            split.add(step.name)
        elif isinstance(step.spec.for_each, list):
            literal.append(step.name)
            split.add(step.name)
        elif step.for_each is None:
            problems.append(f"{where} runs once; every shard would run it again")
        else:
            problems.append(
                f"{where} fans out over {step.spec.for_each!r}, not a parameter or a written "
                "list that can be split"
            )
    for step in pipeline.steps:
        where = f"step '{step.name}'"
        written = _templates(step.for_each) if isinstance(step.spec.for_each, list) else ()
        for template in [*_templates(step.arguments), *written]:
            for ref in template.references:
                if ref.root == "index":
                    problems.append(
                        f"{where} uses {{{{ index }}}}, which a shard would count from 0 again"
                    )
                elif ref.root == "params" and ref.name in params:
                    problems.append(
                        f"{where} reads {ref.text} beyond for_each; a shard holds only its slice"
                    )
    if not split:
        problems.append("no step fans out over a list to split")
    return params, literal, problems


# --- running them --------------------------------------------------------------------------------


@dataclass
class ShardOutcome:
    """How one shard ended: its last flow run, its state, and its summary if it left one."""

    shard: Shard
    flow_run_id: str | None = None
    state: str = "NOT_STARTED"
    message: str = ""
    summary: RunSummary | None = None
    attempts: int = 0
    restart_at: float | None = None
    """When a crashed shard is started again (``time.monotonic()``)."""


def restart_delay(pipeline: Pipeline, retention: RetentionSettings) -> float:
    """Seconds a crashed shard waits before it is started again: until a submit lost with it
    is provably not on fal (its start deadline plus the listing's lag, :mod:`falflow.tasks.lost`),
    so the resumed shard sends it again instead of reporting its outcome unknown."""
    deadlines = [0.0]
    for step in pipeline.steps:
        override = step.spec.retention
        if override is not None and override.start_timeout_seconds is not None:
            deadlines.append(override.start_timeout_seconds)
        else:
            deadlines.append(retention.policy_for(step.spec.endpoint).start_timeout_seconds or 0.0)
    return max(deadlines) + LISTING_LAG.total_seconds()


StartShard = Callable[[Shard], Awaitable[State[Any]]]
"""Runs one shard in this process to its end (the pipeline flow called as a subflow)."""


async def run_shards(
    shards: Sequence[Shard],
    parameters_for: Callable[[Shard], dict[str, Any]],
    bucket: Bucket,
    in_process: StartShard,
    restart_after: float,
) -> list[ShardOutcome]:
    """Every shard to its end: on the work pool of the current flow run's deployment, else
    one after another in this process through ``in_process``. A crashed shard is started
    again ``restart_after`` seconds later (:func:`restart_delay`)."""
    context = FlowRunContext.get()
    flow_run = None if context is None else context.flow_run
    deployment = None if flow_run is None else flow_run.deployment_id
    if flow_run is None or deployment is None:
        outcomes = []
        for shard in shards:
            outcome = ShardOutcome(shard, attempts=1)
            await _settle(outcome, await in_process(shard))
            outcomes.append(outcome)
        return outcomes
    return await _on_work_pool(
        shards, parameters_for, bucket, deployment, str(flow_run.id), restart_after
    )


async def _on_work_pool(
    shards: Sequence[Shard],
    parameters_for: Callable[[Shard], dict[str, Any]],
    bucket: Bucket,
    deployment: UUID,
    parent: str,
    restart_after: float,
) -> list[ShardOutcome]:
    logger = get_run_logger()
    outcomes = {shard.index: ShardOutcome(shard) for shard in shards}

    async def start(outcome: ShardOutcome) -> None:
        outcome.attempts += 1
        shard = outcome.shard
        run = await arun_deployment(
            deployment,
            parameters=parameters_for(shard),
            flow_run_name=f"{shard.run_key}#{outcome.attempts}",
            timeout=0,  # started, not awaited: the pool's workers run the shards side by side
            # the parent's retry (same flow run) finds the shard runs it started, not new ones
            idempotency_key=f"{parent}:{shard.run_key}:{outcome.attempts}",
        )
        outcome.flow_run_id, outcome.state = str(run.id), "SCHEDULED"

    for outcome in outcomes.values():
        await start(outcome)
    logger.info("started %d shard runs on the work pool", len(outcomes))
    pending = set(outcomes)
    while pending:
        await anyio.sleep(POLL_SECONDS)
        ids = [UUID(outcomes[i].flow_run_id or "") for i in pending]
        runs: list[FlowRun] = []
        async with get_client() as client:
            for first in range(0, len(ids), _PAGE):
                some = FlowRunFilterId(any_=ids[first : first + _PAGE])
                runs += await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=some), limit=_PAGE
                )
        by_id = {str(run.id): run for run in runs}
        expired: list[Lease] = []
        for index in sorted(pending):
            outcome = outcomes[index]
            run = by_id.get(outcome.flow_run_id or "")
            if run is None or run.state is None:
                continue
            outcome.state = run.state.type.value
            if not run.state.is_final():
                lease = await _lease(bucket, outcome.shard.run_key)
                dead = lease is not None and not lease.valid(utcnow()) and not lease.released
                if lease is not None and dead and lease.flow_run_id == outcome.flow_run_id:
                    expired.append(lease)  # its process is gone (a lost worker)
                continue
            if run.state.type == StateType.CRASHED and outcome.attempts < SHARD_ATTEMPTS:
                if outcome.restart_at is None:
                    outcome.restart_at = time.monotonic() + restart_after
                    logger.warning(
                        "shard %s crashed (%s); starting it again in %.0f s (attempt %d), it "
                        "resumes from its ledger",
                        outcome.shard.run_key,
                        run.state.message or "no message",
                        restart_after,
                        outcome.attempts + 1,
                    )
                elif time.monotonic() >= outcome.restart_at:
                    outcome.restart_at = None
                    await start(outcome)
                continue
            await _settle(outcome, run.state)
            pending.discard(index)
            summary = outcome.summary
            told = outcome.message
            if summary is not None:
                told = (summary.problem_lines(limit=1) or ["all archived and deleted"])[0]
            logger.info("shard %s ended %s: %s", outcome.shard.run_key, outcome.state.lower(), told)
        if expired:
            await mark_crashed(expired)  # next round starts them again
    return [outcomes[i] for i in sorted(outcomes)]


async def _lease(bucket: Bucket, run_key: str) -> Lease | None:
    data = await bucket.get_bytes(lease_key(run_key))
    if data is None:
        return None
    try:
        return Lease.model_validate_json(data)
    except ValidationError:
        return None


async def _settle(outcome: ShardOutcome, state: State[Any]) -> None:
    """Record a finished shard run's state and read its persisted summary."""
    outcome.state = state.type.value
    outcome.message = state.message or ""
    if outcome.flow_run_id is None:
        outcome.flow_run_id = str(state.state_details.flow_run_id or "") or None
    try:
        result = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # a crashed run left no result: its state says why
        outcome.message = outcome.message or f"{type(exc).__name__}: {exc}"
        return
    if isinstance(result, RunFailed):
        outcome.summary = result.summary
    elif isinstance(result, dict):
        try:
            outcome.summary = RunSummary.model_validate(result)
        except ValidationError:
            outcome.message = outcome.message or "its result is not a run summary"
    elif isinstance(result, BaseException):
        outcome.message = outcome.message or f"{type(result).__name__}: {result}"


# --- one report ----------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?P<step>.*)\[(?P<index>\d+)\]$")


def _global_label(label: str, start: int) -> str:
    """``image[3]`` of a shard that starts at item 2000 is ``image[2003]`` of the batch."""
    found = _LABEL.match(label)
    if found is None:
        return label
    return f"{found['step']}[{int(found['index']) + start}]"


def gather(outcomes: Sequence[ShardOutcome], run_key: str, bucket_url: str) -> RunSummary:
    """The shards' summaries as one: counts added up, problems named by their item in the whole
    batch; a shard that left no summary (it crashed for good) is a failed item of its own.
    ``ok`` only when every shard completed and was ok."""
    totals: dict[str, Any] = {
        "requests": 0,
        "archived": 0,
        "archived_files": 0,
        "archived_bytes": 0,
        "deleted": 0,
    }
    lists: dict[str, Any] = {
        name: []
        for name in (
            "failed",
            "skipped",
            "unverified",
            "unknown",
            "not_deleted",
            "expiring",
            "kept_for_resume",
        )
    }
    ok = True
    for outcome in outcomes:
        summary = outcome.summary
        if summary is None:
            ok = False
            lists["failed"].append(
                Problem(
                    job=outcome.shard.run_key,
                    item=f"shard {outcome.shard.index} "
                    f"(items {outcome.shard.start}-{outcome.shard.stop - 1})",
                    state=outcome.state.lower(),
                    error=outcome.message or "its run left no summary",
                )
            )
            continue
        ok = ok and summary.ok and outcome.state == StateType.COMPLETED.value
        for name in totals:
            totals[name] += getattr(summary, name)
        for name, problems in lists.items():
            for problem in getattr(summary, name):
                label = _global_label(problem.item or problem.job, outcome.shard.start)
                problems.append(problem.model_copy(update={"item": label}))
    return RunSummary(
        run_key=run_key, bucket=bucket_url, shards=len(outcomes), ok=ok, **totals, **lists
    )


def shard_table(outcomes: Sequence[ShardOutcome]) -> list[dict[str, Any]]:
    """One row per shard for the parent's run page."""
    return [
        {
            "shard": o.shard.index,
            "items": f"{o.shard.start}-{o.shard.stop - 1}",
            "run key": o.shard.run_key,
            "flow run": o.flow_run_id or "",
            "state": o.state.lower(),
            "attempts": o.attempts,
            "archived": o.summary.archived if o.summary else 0,
            "deleted": o.summary.deleted if o.summary else 0,
            "problems": len(o.summary.problem_lines(limit=10**9)) if o.summary else 1,
        }
        for o in outcomes
    ]
