"""The deployable pipeline flow: a declarative spec run end to end with retention done right.

Example (a deployment's entrypoint is ``falflow.flows.pipeline.run_pipeline``)::

    from falflow import run_pipeline

    summary = await run_pipeline("sample", {"prompts": ["a red fox"]}, run_key="foxes-01")
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from falflow.flows.scope import default_run_key, retention_scope
from falflow.flows.spec import execute, load_pipeline
from falflow.flows.summary import RunFailed


@flow(name="falflow-pipeline", log_prints=False)
async def run_pipeline(
    spec: str | dict[str, Any],
    parameters: dict[str, Any] | None = None,
    run_key: str | None = None,
) -> dict[str, Any]:
    """Run a declarative pipeline: validate it, run its DAG, archive everything, clean up fal.

    ``spec`` is inline YAML/JSON text, a dict, a file path, or the name of a spec shipped in
    ``flows/specs`` (``sample``). ``parameters`` fill its ``params``. ``run_key`` names the run in
    the bucket (``ledger/<run_key>/``); the same key resumes a run without re-submitting anything
    (default: ``<spec name>-<flow run id>``). Returns the :class:`~falflow.flows.summary.RunSummary` as JSON.

    Raises:
        SpecError: invalid spec or parameters (nothing was submitted).
        RunFailed: some request failed, was skipped, or is left on fal (after cleanup).
    """
    pipeline = load_pipeline(spec)
    params = pipeline.bind(parameters)
    async with retention_scope(run_key=run_key or default_run_key(pipeline.spec.name)) as scope:
        await execute(pipeline, params, scope)
    summary = scope.summary
    assert summary is not None  # set by the scope's cleanup
    if not summary.ok:
        raise RunFailed(summary)
    return summary.model_dump(mode="json")
