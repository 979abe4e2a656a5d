"""Generation DAGs in Python: ``generate()`` steps inside a retention scope.

Inside any async Prefect flow::

    import asyncio
    from prefect import flow
    from falflow import RetentionOverride, generate, ref, retained

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
request is archived into the bucket as soon as it completes, and the scope raises
:class:`~falflow.flows.summary.RunFailed` if a step failed and nobody awaited it.

When fal's copy goes (:mod:`falflow.flows.scope`): as soon as a step is archived and every
``generate()`` that refers to it with ``ref()`` has finished — a step nobody refers to, right
after it is archived. A ``ref()`` made later (even after the deletion) still works: the reader
gets the archived copy, served again, never a dead URL. A fal URL read from ``.output`` and
passed on by hand is not tracked: pass ``keep_until_scope_end=True`` to ``generate()`` to keep
that step's fal copy until the scope ends.
``async with retention_scope(settings, run_key) as scope:`` is the same without the decorator,
with ``scope.summary`` readable after the block.

Job ids hash the step name, endpoint and arguments, so re-running with the same run key resumes
from the ledger (nothing recorded is submitted again). Each step (the ``name=`` given to
``generate``, else its endpoint) runs its requests in lanes: one Prefect task run ``<step> #<n>``
per up to ``limits.jobs_per_task_run`` requests (:mod:`falflow.tasks.lanes`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio

from falflow.flows.scope import RetentionScope, current_scope, retention_scope
from falflow.settings import RetentionOverride
from falflow.tasks.models import Job, JobRecord, check_endpoint_id, job_id_for, request_digest
from falflow.tasks.paths import PathSegment, get_path, parse_path
from falflow.tasks.uploads import upload_input

P = ParamSpec("P")
R = TypeVar("R")


class UpstreamFailed(RuntimeError):
    """A step was not run because a step it refers to failed."""


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
        self._readers = 0
        """``generate()`` calls that refer to this step and have not finished."""
        self._job_id: str | None = None

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

    @property
    def job_id(self) -> str | None:
        """Its ledger job id, once its arguments are known and the request is being made."""
        return self._job_id

    @property
    def failed_unobserved(self) -> bool:
        """It failed and nobody awaited it (the scope raises for it)."""
        return self.done and self._result is None and not self._observed

    def _finish(self, result: StepResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def _hold(self, scope: RetentionScope) -> None:
        """A new reader: fal's copy stays until it has finished (see :meth:`_release`)."""
        self._readers += 1
        if self._job_id is not None:
            scope.hold(self._job_id)

    def _release(self, scope: RetentionScope) -> None:
        self._readers -= 1
        if self._job_id is not None:
            scope.release(self._job_id)


@dataclass(frozen=True)
class Ref:
    """Where a later step's argument comes from: ``path`` in ``step``'s output."""

    step: Step
    path: tuple[PathSegment, ...]


def ref(step: Step, path: str = "") -> Ref:
    """``ref(image, "images[0].url")``: the argument waits for ``image`` and takes that value."""
    return step.ref(path)


def generate(
    endpoint: str,
    arguments: Mapping[str, Any],
    *,
    retention: RetentionOverride | None = None,
    name: str | None = None,
    keep_until_scope_end: bool = False,
) -> Step:
    """Start one fal request in the current retention scope; ``await`` the result for its output.

    ``arguments`` may hold ``ref(step, "path")`` values anywhere: the request waits for those
    steps, and their fal copies stay until it has finished. ``retention`` overrides the
    endpoint's policy for this request; ``name`` groups requests into lanes and names their task
    runs (default: the endpoint); ``keep_until_scope_end`` keeps this step's fal copy until the
    scope ends (for fal URLs read from ``.output`` and passed on by hand), instead of deleting
    it once it is archived and its ``ref()`` readers have finished.

    Raises:
        ValueError: ``endpoint`` is not a fal endpoint id.
        RuntimeError: no retention scope is open, or it has ended.
    """
    check_endpoint_id(endpoint)
    scope = current_scope()
    if scope.closing:
        raise RuntimeError("this retention scope has ended: call generate() inside it")
    step = Step(name or endpoint, endpoint)
    arguments = dict(arguments)
    read = _referred(arguments)
    for upstream in read:
        upstream._hold(scope)
    scope.start(_run_step, scope, step, arguments, retention, read, keep_until_scope_end)
    return step


def _referred(value: Any) -> list[Step]:
    """The distinct steps ``ref()``-ed anywhere in ``value``."""
    found: dict[int, Step] = {}
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, Ref):
            found.setdefault(id(item.step), item.step)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return list(found.values())


async def _run_step(
    scope: RetentionScope,
    step: Step,
    arguments: dict[str, Any],
    retention: RetentionOverride | None,
    read: list[Step],
    keep_until_scope_end: bool,
) -> None:
    await _run(scope, step, arguments, retention, keep_until_scope_end, read)
    if step._result is None:  # the scope raises for failures nobody awaited (it keeps no other)
        scope.steps.append(step)
    for upstream in read:  # not reached when cancelled: a resumed run may still read them
        upstream._release(scope)


async def _run(
    scope: RetentionScope,
    step: Step,
    arguments: dict[str, Any],
    retention: RetentionOverride | None,
    keep_until_scope_end: bool,
    read: list[Step],
) -> None:
    await scope.plan(1)
    try:
        resolved = await _resolve_refs(arguments)
        for upstream in read:  # one deleted before this reader came: its archive is served
            if upstream._job_id is not None:
                await scope.settled(upstream._job_id)
        # identical requests (in any step) are told apart by how many came before
        seen = scope.occurrence(request_digest(step.endpoint, resolved))
        job = Job(
            job_id=job_id_for(scope.run_key, step.name, step.endpoint, resolved, occurrence=seen),
            endpoint=step.endpoint,
            arguments=resolved,
            policy=scope.policy_for(step.endpoint, retention),
        )
    except Exception as exc:
        await scope.note_skipped(step.name, step.name, step.endpoint, str(exc))
        step._finish(None, exc)
        return
    step._job_id = job.job_id
    scope.hold(job.job_id, step._readers)
    if keep_until_scope_end:
        scope.pin(job.job_id)
    try:
        outcome = await scope.run(job, group=step.name)
    except BaseException as exc:
        step._finish(None, exc)
        if not isinstance(exc, Exception):
            raise
        return
    if outcome.output is None:  # fal's output was refused (recorded): nothing to read
        step._finish(None, ValueError(outcome.record.error or "its output was refused"))
        return
    step._finish(StepResult(step.name, job.job_id, outcome.record, outcome.output), None)


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


async def upload(
    data: Path | str | bytes, *, content_type: str | None = None, file_name: str | None = None
) -> str:
    """Upload a local input file (a path, or bytes with ``content_type``) to fal's CDN for a
    later ``generate()``; returns its URL. Inside a retention scope only.

    The upload carries the policy's upload TTL (``retention.upload_ttl_seconds``), and is hidden
    (its ACL set to ``hide``) when the scope ends: fal's payload deletion never removes input
    files.
    """
    return await upload_input(
        current_scope().runtime, data, content_type=content_type, file_name=file_name
    )


def retained(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Run an async flow body inside a :func:`retention_scope` (settings from the environment)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        async with retention_scope():
            return await fn(*args, **kwargs)

    return wrapper


__all__ = ["Ref", "Step", "StepResult", "UpstreamFailed", "generate", "ref", "retained", "upload"]
