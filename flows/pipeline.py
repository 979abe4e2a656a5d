"""The deployable pipeline flow: a declarative spec run end to end with retention done right.

Its result, the :class:`~falflow.flows.summary.RunSummary` as JSON, is persisted (Prefect's
result storage: ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``, e.g. an ``S3Bucket`` block, or the
worker's local storage), so whoever started the run reads it back::

    from prefect.deployments import run_deployment

    flow_run = await run_deployment("falflow-pipeline/on-event", parameters={"spec": "sample"})
    summary = await flow_run.state.aresult(raise_on_failure=False)  # a dict, or RunFailed

Example (a deployment's entrypoint is ``falflow.flows.pipeline.run_pipeline``)::

    from falflow import run_pipeline

    summary = await run_pipeline("sample", {"prompts": ["a red fox"]}, run_key="foxes-01")

With ``shard_size`` the batch is split into shards (:mod:`falflow.flows.shards`): one child flow
run each on the work pool of the run's own deployment (in this process, one after another,
without one), and the result is the shards' summaries gathered into one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, cast

from prefect import flow
from prefect.artifacts import acreate_table_artifact
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.runtime import flow_run as prefect_flow_run
from prefect.states import Failed

from falflow.flows.console import outlive_the_console
from falflow.flows.scope import default_run_key, retention_scope
from falflow.flows.shards import (
    Shard,
    gather,
    plan_shards,
    restart_delay,
    run_shards,
    shard_table,
)
from falflow.flows.spec import Pipeline, SpecError, execute, load_pipeline
from falflow.flows.summary import RESULT_SERIALIZER, RunFailed, RunSummary
from falflow.settings import Settings, load_settings
from falflow.settings.blocks import with_blocks
from falflow.tasks.liveness import holding_lease
from falflow.tasks.report import artifact_key
from falflow.tasks.store import open_bucket


@flow(
    name="falflow-pipeline",
    log_prints=False,
    persist_result=True,
    result_serializer=RESULT_SERIALIZER,
)
async def run_pipeline(
    spec: str | dict[str, Any],
    parameters: dict[str, Any] | None = None,
    run_key: str | None = None,
    fal_credentials: str | None = None,
    bucket_block: str | None = None,
    shard_size: int | None = None,
) -> dict[str, Any] | State[dict[str, Any]]:
    """Run a declarative pipeline: validate it, run its DAG, archive everything, clean up fal.

    ``spec`` is inline YAML/JSON text, a dict, a file path, or the name of a spec shipped in
    ``flows/specs`` (``sample``). ``parameters`` fill its ``params``. ``run_key`` names the run in
    the bucket (``ledger/<run_key>/``); the same key resumes a run without re-submitting anything
    (default: ``<spec name>-<flow run id>``). ``fal_credentials`` names a ``FalCredentials``
    block and ``bucket_block`` a bucket block (``s3-bucket/archive``) to use instead of the
    environment's keys and bucket (:mod:`falflow.settings.blocks`). ``shard_size`` splits the
    batch into shards of that many items, run as ``<run_key>.shard-<i>`` child flow runs
    (:mod:`falflow.flows.shards`). Returns the
    :class:`~falflow.flows.summary.RunSummary` as JSON; the run page has its story (summary,
    table and progress artifacts keyed by the spec's name).

    A run where something failed, was skipped or is left on fal ends Failed with the problems as
    its state message (no traceback: a model refusing a prompt is not a bug in the flow), and
    awaiting it raises :class:`RunFailed` carrying the summary.

    Raises:
        SpecError: invalid spec or parameters, or an inline spec whose templates ``prefect deploy``
            emptied (:func:`refuse_rendered_spec`); nothing was submitted.
        RunFailed: some request failed, was skipped, or is left on fal (after cleanup).
    """
    outlive_the_console()
    pipeline = load_pipeline(spec)
    context = FlowRunContext.get()
    refuse_rendered_spec(
        spec,
        pipeline,
        deployed=bool(context and context.flow_run and context.flow_run.deployment_id),
    )
    params = pipeline.bind(parameters)
    name = pipeline.spec.name
    settings = await with_blocks(
        load_settings(), fal_credentials=fal_credentials, bucket=bucket_block
    )
    run_key = run_key or default_run_key(name)
    if shard_size is not None:
        summary = await _sharded(
            pipeline,
            spec,
            params,
            run_key,
            shard_size,
            settings,
            {"fal_credentials": fal_credentials, "bucket_block": bucket_block},
        )
    else:
        async with retention_scope(settings, run_key, name=name) as scope:
            await execute(pipeline, params, scope)
        assert scope.summary is not None  # set by the scope's cleanup
        summary = scope.summary
    if not summary.ok:
        failed = RunFailed(summary)
        return Failed(message=failed.headline(), data=failed)
    return summary.model_dump(mode="json")


async def _sharded(
    pipeline: Pipeline,
    spec: str | dict[str, Any],
    params: dict[str, Any],
    run_key: str,
    shard_size: int,
    settings: Settings,
    blocks: dict[str, str | None],
) -> RunSummary:
    """Run the batch as shards and gather their summaries (the parent opens no retention scope:
    it submits nothing, each shard holds its own lease and ledger)."""
    shards = plan_shards(pipeline, params, shard_size, run_key)

    def parameters_for(shard: Shard) -> dict[str, Any]:
        return {
            "spec": shard.spec_for(pipeline, spec),
            "parameters": shard.parameters,
            "run_key": shard.run_key,
            **blocks,
        }

    async def in_process(shard: Shard) -> State[Any]:
        called = run_pipeline(**parameters_for(shard), return_state=True)
        return await cast("Awaitable[State[Any]]", called)

    bucket = open_bucket(settings.bucket)
    delay = restart_delay(pipeline, settings.retention)
    # the parent's lease keeps the janitor off a crashed shard that the parent will start again
    seconds = settings.limits.lease_seconds
    async with holding_lease(bucket, run_key, prefect_flow_run.id, seconds):
        outcomes = await run_shards(shards, parameters_for, bucket, in_process, delay)
    summary = gather(outcomes, run_key, bucket.url)
    await acreate_table_artifact(
        shard_table(outcomes),
        key=artifact_key("shards", pipeline.spec.name),
        description=f"Run {run_key}: one row per shard (ledger/{run_key}.shard-<i>/)",
    )
    return summary


def refuse_rendered_spec(spec: str | dict[str, Any], pipeline: Pipeline, *, deployed: bool) -> None:
    """Refuse an inline spec that ``prefect deploy`` has rendered.

    ``prefect deploy`` fills ``{{ … }}`` in a deployment's parameters from its build steps, so a
    spec written inline in ``prefect.yaml`` loses its templates: ``"photo of {{ item }}"``
    becomes ``"photo of "``, and ``for_each: "{{ params.prompts }}"`` disappears. In a
    deployment's flow run, an inline spec with no template left although it declares
    parameters or has several steps is such a spec: refused before anything is submitted. Give
    a deployment its spec by name or path instead (``spec: specs/poster.yaml``), or send it in
    an event (an event's payload is not rendered again).

    Raises:
        SpecError: saying so.
    """
    inline = isinstance(spec, dict) or "\n" in spec or spec.lstrip().startswith("{")
    if not deployed or not inline:
        return
    if "{{" in (spec if isinstance(spec, str) else json.dumps(spec)):
        return
    if pipeline.spec.params or len(pipeline.steps) > 1:
        raise SpecError(
            [
                "this inline spec has no {{ … }} template left although it declares parameters "
                "or has several steps: `prefect deploy` renders templates in deployment "
                "parameters and emptied them; put the spec in a file and give its path "
                "(spec: specs/my-pipeline.yaml) or a shipped spec's name instead"
            ],
            source=f"spec '{pipeline.spec.name}'",
        )
