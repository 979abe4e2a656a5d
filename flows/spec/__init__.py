"""Declarative generation pipelines: a YAML/JSON spec, validated before anything is submitted.

A spec names its parameters and its steps; each step is one fal endpoint called with argument
templates, once or once per item of a list (``for_each``)::

    name: sample
    params:
      prompts: {type: list, default: ["a red fox", "a lighthouse at dusk"]}
    steps:
      - name: image
        endpoint: fal-ai/flux/schnell
        for_each: "{{ params.prompts }}"
        arguments: {prompt: "{{ item }}", image_size: square_hd}
      - name: upscale
        endpoint: fal-ai/esrgan
        for_each: "{{ steps.image }}"          # item i of upscale waits only for item i of image
        arguments: {image_url: "{{ item.images[0].url }}"}
        retention: {media_ttl_seconds: 3600}   # settings.RetentionOverride for this step

- ``params``: name → ``{type, default, description}``; ``type`` is string, integer, number,
  boolean, list, object or any; without ``default`` the parameter is required.
- ``steps``: ``name``, ``endpoint``, ``arguments``, optional ``for_each``, ``retention``
  (``media_ttl_seconds``, ``never_expire``, ``store_io``, ``priority``,
  ``start_timeout_seconds``) and ``description``.
- Templates: ``{{ params.NAME… }}``, ``{{ steps.NAME… }}`` (the step's fal output; for a step
  with ``for_each``, the list of its outputs), and in a ``for_each`` step ``{{ item… }}`` and
  ``{{ index }}``; paths like ``.images[0].url`` or ``["odd key"]``. A string that is exactly one
  template keeps the JSON type of what it names; a template inside other text renders as text
  (JSON for lists and objects).
- ``for_each``: a list (which may hold templates), or one template naming a list:
  ``{{ params.prompts }}``, ``{{ steps.grid.images }}`` (a list inside one output: waits for that
  step), or ``{{ steps.image }}`` (a fanned-out step: item by item, item i waits only for item i).
- Steps run as soon as what they refer to is done, in whatever order they are written; any other
  reference to a step waits for all of it. A failed item skips the items that follow it and the
  steps that need all of its step; every other item goes on, and cleanup still happens.
- Job ids hash the run key, step, item index and arguments: re-running with the same run key
  resumes (nothing recorded is submitted again); changed arguments make new requests.

Validation (:func:`load_pipeline`, :meth:`Pipeline.bind`) refuses unknown fields, wrong types,
unknown steps or parameters, cycles, ``item`` outside a ``for_each`` step, a ``for_each`` that is
not a list, and missing or mistyped parameters — each message naming the step and the field.
"""

from falflow.flows.spec.compiler import Pipeline, PlannedStep, compile_pipeline
from falflow.flows.spec.executor import execute
from falflow.flows.spec.loader import SPEC_DIR, load_pipeline, shipped_specs
from falflow.flows.spec.schema import ParamSpec, PipelineSpec, RenderError, SpecError, StepSpec
from falflow.flows.spec.templates import Context, Reference, Template, parse_template, render

__all__ = [
    "SPEC_DIR",
    "Context",
    "ParamSpec",
    "Pipeline",
    "PipelineSpec",
    "PlannedStep",
    "Reference",
    "RenderError",
    "SpecError",
    "StepSpec",
    "Template",
    "compile_pipeline",
    "execute",
    "load_pipeline",
    "parse_template",
    "render",
    "shipped_specs",
]
