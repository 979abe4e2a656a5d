"""falflow: generative-media jobs on fal under Prefect, with the data-retention policy done right.

Every request carries the retention headers, every output is archived into your bucket and
verified by sha256, then fal's copy is deleted and the deletion recorded. Inside your own Prefect
project::

    from prefect import flow

    from falflow import generate, ref, retained

    @flow
    @retained  # archive everything, then delete fal's copies when the flow body ends
    async def poster(prompt: str) -> str:
        image = generate("fal-ai/flux/schnell", {"prompt": prompt}, name="image")
        big = generate("fal-ai/esrgan", {"image_url": ref(image, "images[0].url")}, name="upscale")
        return (await big).record.objects[0].key  # the archived copy's key in your bucket

Declarative pipelines: :func:`run_pipeline` (a deployable flow taking a YAML/JSON spec), checked
beforehand with :func:`load_pipeline`. Leftovers of crashed runs: the :func:`janitor` flow.
Configuration: :class:`Settings` (environment variables ``FAL_KEY``, ``FALFLOW_*``, or ``.env``).

The names below are imported on first use, so ``import falflow`` stays cheap (the CLI quiets
Prefect before importing it).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falflow.flows.doctor import doctor
    from falflow.flows.dsl import (
        Ref,
        Step,
        StepResult,
        UpstreamFailed,
        generate,
        ref,
        retained,
        upload,
    )
    from falflow.flows.janitor import janitor
    from falflow.flows.pipeline import run_pipeline
    from falflow.flows.scope import RetentionScope, current_scope, retention_scope
    from falflow.flows.spec import Pipeline, SpecError, load_pipeline
    from falflow.flows.summary import Problem, RunFailed, RunProgress, RunSummary
    from falflow.settings import (
        RetentionOverride,
        RetentionPolicy,
        Settings,
        SettingsError,
        load_settings,
    )
    from falflow.settings.blocks import FalCredentials
    from falflow.tasks.events import request_pipeline

_EXPORTS = {
    "Ref": "falflow.flows.dsl",
    "Step": "falflow.flows.dsl",
    "StepResult": "falflow.flows.dsl",
    "UpstreamFailed": "falflow.flows.dsl",
    "generate": "falflow.flows.dsl",
    "ref": "falflow.flows.dsl",
    "retained": "falflow.flows.dsl",
    "request_pipeline": "falflow.tasks.events",
    "doctor": "falflow.flows.doctor",
    "janitor": "falflow.flows.janitor",
    "run_pipeline": "falflow.flows.pipeline",
    "RetentionScope": "falflow.flows.scope",
    "current_scope": "falflow.flows.scope",
    "retention_scope": "falflow.flows.scope",
    "Pipeline": "falflow.flows.spec",
    "SpecError": "falflow.flows.spec",
    "load_pipeline": "falflow.flows.spec",
    "Problem": "falflow.flows.summary",
    "RunFailed": "falflow.flows.summary",
    "RunProgress": "falflow.flows.summary",
    "RunSummary": "falflow.flows.summary",
    "RetentionOverride": "falflow.settings",
    "RetentionPolicy": "falflow.settings",
    "Settings": "falflow.settings",
    "SettingsError": "falflow.settings",
    "load_settings": "falflow.settings",
    "FalCredentials": "falflow.settings.blocks",
    "upload": "falflow.flows.dsl",
}

__all__ = [
    "FalCredentials",
    "Pipeline",
    "Problem",
    "Ref",
    "RetentionOverride",
    "RetentionPolicy",
    "RetentionScope",
    "RunFailed",
    "RunProgress",
    "RunSummary",
    "Settings",
    "SettingsError",
    "SpecError",
    "Step",
    "StepResult",
    "UpstreamFailed",
    "current_scope",
    "doctor",
    "generate",
    "janitor",
    "load_pipeline",
    "load_settings",
    "ref",
    "request_pipeline",
    "retained",
    "retention_scope",
    "run_pipeline",
    "upload",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'falflow' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
