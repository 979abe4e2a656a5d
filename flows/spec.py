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

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from flows.dag import RetentionScope, RunSummary, default_run_key, retention_scope
from flows.paths import PathSegment, format_path, get_path, parse_path
from settings import RetentionOverride
from tasks.models import Job

SPEC_DIR = Path(__file__).parent / "specs"
"""The shipped specs (``falflow specs`` lists them; package data of ``flows``)."""

_ENDPOINT = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class SpecError(ValueError):
    """An invalid spec or parameter set. ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], *, source: str = "spec") -> None:
        self.problems = list(problems)
        super().__init__(
            f"invalid pipeline {source}:\n"
            + "\n".join(f"  - {p}" for p in self.problems)
            + "\nFix the spec (or the parameters) and run again; nothing was submitted."
        )


class RenderError(ValueError):
    """A template could not be filled from an earlier step's output at run time."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ParamType = Literal["string", "integer", "number", "boolean", "list", "object", "any"]

_PARAM_TYPES: dict[str, TypeAdapter[Any]] = {
    "string": TypeAdapter(str),
    "integer": TypeAdapter(int),
    "number": TypeAdapter(float),
    "boolean": TypeAdapter(bool),
    "list": TypeAdapter(list[Any]),
    "object": TypeAdapter(dict[str, Any]),
    "any": TypeAdapter(Any),
}


class ParamSpec(_Strict):
    """A pipeline parameter. Without ``default`` it is required."""

    type: ParamType = "any"
    default: Any = None
    description: str = ""

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class StepSpec(_Strict):
    """One step: an endpoint called once, or once per item of ``for_each``."""

    name: Annotated[str, Field(pattern=_NAME, max_length=64)]
    endpoint: Annotated[str, Field(pattern=_ENDPOINT, max_length=200)]
    arguments: dict[str, Any] = Field(default_factory=dict)
    for_each: str | list[Any] | None = None
    """A list, or one template naming a list (``{{ params.x }}``, ``{{ steps.a }}``, ``{{ steps.a.images }}``)."""
    retention: RetentionOverride | None = None
    description: str = ""


class PipelineSpec(_Strict):
    """A whole spec, as written."""

    name: Annotated[str, Field(pattern=_NAME, max_length=64)] = "pipeline"
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    steps: Annotated[list[StepSpec], Field(min_length=1)]


# --- templates ---------------------------------------------------------------------------------

_OPEN, _CLOSE = "{{", "}}"
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)

Root = Literal["params", "steps", "item", "index"]


@dataclass(frozen=True)
class Reference:
    """``{{ root.name.path }}`` parsed; ``name`` is the parameter or step (None for item/index)."""

    root: Root
    name: str | None
    path: tuple[PathSegment, ...]
    text: str

    @property
    def label(self) -> str:
        """The reference without braces, for messages (``steps.image.images[0]``)."""
        head = self.root if self.name is None else f"{self.root}.{self.name}"
        rest = format_path(self.path)
        return head + ("" if not rest else rest if rest.startswith("[") else "." + rest)


@dataclass(frozen=True)
class Template:
    """A string holding templates: either exactly one (``whole``, keeps JSON type) or text parts."""

    parts: tuple[str | Reference, ...]

    @property
    def whole(self) -> Reference | None:
        if len(self.parts) == 1 and isinstance(self.parts[0], Reference):
            return self.parts[0]
        return None

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(p for p in self.parts if isinstance(p, Reference))


def parse_template(text: str) -> Template | str:
    """The string itself when it holds no template.

    Raises:
        ValueError: an unclosed ``{{`` or a reference that does not parse.
    """
    if _OPEN not in text and _CLOSE not in text:
        return text
    parts: list[str | Reference] = []
    position = 0
    for match in _TEMPLATE.finditer(text):
        literal = text[position : match.start()]
        if _OPEN in literal or _CLOSE in literal:
            raise ValueError(f"unbalanced braces in {text!r}")
        if literal:
            parts.append(literal)
        parts.append(_parse_reference(match.group(1).strip(), match.group(0)))
        position = match.end()
    tail = text[position:]
    if _OPEN in tail or _CLOSE in tail:
        raise ValueError(f"unbalanced braces in {text!r}: every '{{{{' needs a '}}}}'")
    if tail:
        parts.append(tail)
    references = [p for p in parts if isinstance(p, Reference)]
    if len(references) == 1 and all(isinstance(p, Reference) or not p.strip() for p in parts):
        parts = [references[0]]  # " {{ x }} " still keeps x's JSON type
    return Template(tuple(parts))


def _parse_reference(expr: str, text: str) -> Reference:
    if not expr:
        raise ValueError(f"empty template {text!r}")
    try:
        segments = parse_path(expr)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    root = segments[0]
    if root in ("params", "steps"):
        if len(segments) < 2 or not isinstance(segments[1], str):
            raise ValueError(
                f"{text!r}: name a {'parameter' if root == 'params' else 'step'}, "
                f"e.g. {{{{ {root}.name }}}}"
            )
        kind: Root = "params" if root == "params" else "steps"
        return Reference(kind, segments[1], segments[2:], text)
    if root == "item":
        return Reference("item", None, segments[1:], text)
    if root == "index":
        if len(segments) > 1:
            raise ValueError(f"{text!r}: index is a number, it has no fields")
        return Reference("index", None, (), text)
    raise ValueError(
        f"{text!r}: a template starts with params., steps., item or index (got {root!r})"
    )


Compiled = Any
"""An argument tree with every templated string replaced by a :class:`Template`."""


def compile_value(value: Any) -> Compiled:
    if isinstance(value, str):
        return parse_template(value)
    if isinstance(value, dict):
        return {key: compile_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [compile_value(item) for item in value]
    return value


def _strings(value: Any, field: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON tree, with its field path (``arguments.loras[0].path``)."""
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, _join(field, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{field}[{index}]")


def _join(field: str, key: str) -> str:
    rendered = format_path([key])
    return f"{field}{rendered}" if rendered.startswith("[") else f"{field}.{rendered}"


def _templates(value: Compiled) -> Iterator[Template]:
    if isinstance(value, Template):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _templates(item)
    elif isinstance(value, list):
        for item in value:
            yield from _templates(item)


@dataclass(frozen=True)
class Context:
    """What templates are filled from: parameters, finished steps' outputs, the current item."""

    params: Mapping[str, Any]
    steps: Mapping[str, Any]
    item: Any = None
    index: int | None = None

    def lookup(self, ref: Reference) -> Any:
        if ref.root == "index":
            return self.index
        if ref.root == "item":
            base = self.item
        else:
            base = (self.params if ref.root == "params" else self.steps)[ref.name or ""]
        try:
            return get_path(base, ref.path)
        except LookupError as exc:
            raise LookupError(f"{ref.text}: {exc}") from None


def render(value: Compiled, ctx: Context, field: str) -> Any:
    """Fill every template in ``value``.

    Raises:
        RenderError: naming the field and the template that could not be filled.
    """
    if isinstance(value, Template):
        try:
            whole = value.whole
            if whole is not None:
                return ctx.lookup(whole)
            return "".join(
                part if isinstance(part, str) else _as_text(ctx.lookup(part))
                for part in value.parts
            )
        except LookupError as exc:
            raise RenderError(f"field '{field}': {exc}") from None
    if isinstance(value, dict):
        return {key: render(item, ctx, _join(field, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, ctx, f"{field}[{index}]") for index, item in enumerate(value)]
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --- validation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedStep:
    """A validated step: its compiled templates and what it waits for."""

    spec: StepSpec
    arguments: Compiled
    for_each: Compiled
    """None (one request), or a compiled list / whole-value template naming a list."""
    needs: frozenset[str]
    """Steps whose every item must be done before this step starts."""
    chain: str | None
    """A fanned-out step this one follows item by item (``for_each: "{{ steps.NAME }}"``)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fans_out(self) -> bool:
        return self.spec.for_each is not None


@dataclass(frozen=True)
class Pipeline:
    """A validated spec, its steps in an order where each comes after what it needs."""

    spec: PipelineSpec
    steps: tuple[PlannedStep, ...]
    source: str

    def bind(self, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The parameters checked against the spec, defaults filled in; every template that uses
        only parameters (``for_each`` lists, ``item`` fields of those lists) is tried too.

        Raises:
            SpecError: listing every unknown, missing or mistyped parameter, each by name.
        """
        given = dict(parameters or {})
        declared = self.spec.params
        problems = [
            f"parameter '{name}': not declared by this pipeline ({_names(declared, 'parameters')})"
            for name in given
            if name not in declared
        ]
        values: dict[str, Any] = {}
        for name, param in declared.items():
            if name not in given and param.required:
                problems.append(f"parameter '{name}': required (a {param.type}) but not given")
                continue
            raw = given.get(name, param.default)
            try:
                values[name] = _PARAM_TYPES[param.type].validate_python(raw)
            except ValidationError as exc:
                message = exc.errors(include_url=False)[0]["msg"]
                problems.append(f"parameter '{name}': {message} (declared type: {param.type})")
        if not problems:
            problems = [p for step in self.steps for p in _try_with_params(step, values)]
        if problems:
            raise SpecError(problems, source=self.source)
        return values


def _try_with_params(step: PlannedStep, params: Mapping[str, Any]) -> list[str]:
    """Fill what can be filled before any request: catches a ``for_each`` that is not a list."""
    if step.chain is not None or step.needs:
        return []
    ctx = Context(params, {})
    try:
        items = [None] if step.for_each is None else render(step.for_each, ctx, "for_each")
        if not isinstance(items, list):
            return [
                f"{_where(step.spec)}, field 'for_each': {_label(step.for_each)} is "
                f"{_describe(items)}, not a list"
            ]
        for index, item in enumerate(items):
            render(step.arguments, Context(params, {}, item, index), "arguments")
    except RenderError as exc:
        return [f"{_where(step.spec)}, {exc}"]
    return []


def _label(value: Compiled) -> str:
    return value.whole.text if isinstance(value, Template) and value.whole else "the value"


def _describe(value: Any) -> str:
    return f"a {type(value).__name__} ({json.dumps(value)[:60]})"


def _where(step: StepSpec) -> str:
    return f"step '{step.name}'"


def _names(items: Mapping[str, Any], what: str) -> str:
    return f"{what}: {', '.join(items)}" if items else f"it declares no {what}"


def compile_pipeline(spec: PipelineSpec, *, source: str = "spec") -> Pipeline:
    """Check what pydantic cannot: references, fan-out shapes, unique names, cycles.

    Raises:
        SpecError: every problem found, each naming the step and field.
    """
    problems: list[str] = []
    by_name: dict[str, StepSpec] = {}
    for step in spec.steps:
        if step.name in by_name:
            problems.append(f"{_where(step)}, field 'name': two steps are called '{step.name}'")
        by_name.setdefault(step.name, step)

    planned: dict[str, PlannedStep] = {}
    edges: dict[str, dict[str, str]] = {}  # step -> {needed step: field that needs it}
    for step in spec.steps:
        if step.name in planned:
            continue
        step_problems: list[str] = []
        arguments = _compile_field(step, step.arguments, "arguments", step_problems)
        for_each = _compile_field(step, step.for_each, "for_each", step_problems)
        if isinstance(step.for_each, str) and isinstance(for_each, Template | str):
            whole = for_each.whole if isinstance(for_each, Template) else None
            if whole is None or whole.root not in ("params", "steps"):
                step_problems.append(
                    f"{_where(step)}, field 'for_each': must be a list, or one template naming "
                    f"a list such as '{{{{ params.prompts }}}}' or '{{{{ steps.image }}}}' "
                    f"(got {step.for_each!r})"
                )
        needs: dict[str, str] = {}
        chain: str | None = None
        for where, value in (("arguments", arguments), ("for_each", for_each)):
            for template in _templates(value):
                for ref in template.references:
                    problem = _check_reference(step, where, ref, spec, by_name)
                    if problem:
                        step_problems.append(problem)
                        continue
                    if ref.root != "steps" or ref.name is None:
                        continue
                    is_chain = (
                        where == "for_each"
                        and not ref.path
                        and by_name[ref.name].for_each is not None
                    )
                    if is_chain:
                        chain = ref.name
                    else:
                        needs.setdefault(ref.name, where)
        problems.extend(step_problems)
        edges[step.name] = {**needs, **({chain: "for_each"} if chain else {})}
        planned[step.name] = PlannedStep(step, arguments, for_each, frozenset(needs), chain)

    if not problems:
        problems.extend(_cycles(edges))
    if problems:
        raise SpecError(problems, source=source)
    return Pipeline(
        spec, tuple(planned[name] for name in _topological(edges, list(planned))), source
    )


def _compile_field(step: StepSpec, value: Any, field: str, problems: list[str]) -> Compiled:
    for path, text in _strings(value, field):
        try:
            parse_template(text)
        except ValueError as exc:
            problems.append(f"{_where(step)}, field '{path}': {exc}")
    if any(p.startswith(f"{_where(step)}, field '{field}") for p in problems):
        return None
    return compile_value(value)


def _check_reference(
    step: StepSpec, field: str, ref: Reference, spec: PipelineSpec, by_name: Mapping[str, StepSpec]
) -> str | None:
    where = f"{_where(step)}, field '{field}'"
    if ref.root == "params":
        if ref.name not in spec.params:
            known = _names(spec.params, "parameters")
            return f"{where}: unknown parameter in {ref.text} ({known}; declare it under params:)"
    elif ref.root == "steps":
        if ref.name == step.name:
            return f"{where}: {ref.text} refers to the step itself"
        target = by_name.get(ref.name or "")
        if target is None:
            return f"{where}: unknown step in {ref.text} ({_names(by_name, 'steps')})"
        if target.for_each is not None and ref.path and isinstance(ref.path[0], str):
            return (
                f"{where}: {ref.text}: step '{target.name}' fans out, so steps.{target.name} is "
                f"the list of its outputs; index it (steps.{target.name}[0].…) or follow it item "
                f"by item with for_each: '{{{{ steps.{target.name} }}}}' and {{{{ item.… }}}}"
            )
        if target.for_each is None and not ref.path and field == "for_each":
            return (
                f"{where}: {ref.text}: step '{target.name}' makes one output (an object), not a "
                f"list; name a list inside it, e.g. '{{{{ steps.{target.name}.images }}}}'"
            )
    elif field == "for_each":
        return f"{where}: {ref.text} cannot be used in for_each itself"
    elif step.for_each is None:
        return f"{where}: {ref.text} is only defined in a step with for_each"
    return None


def _cycles(edges: Mapping[str, Mapping[str, str]]) -> list[str]:
    """One message per cycle found, naming the steps and the fields that close it."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []
    found: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for needed in edges.get(name, {}):
            if state.get(needed) == 1:
                loop = [*stack[stack.index(needed) :], needed]
                fields = ", ".join(
                    f"step '{a}' field '{edges[a][b]}' needs '{b}'"
                    for a, b in itertools.pairwise(loop)
                )
                found.append(f"steps form a cycle {' → '.join(loop)} ({fields})")
            elif state.get(needed) is None:
                visit(needed)
        stack.pop()
        state[name] = 2

    for name in edges:
        if name not in state:
            visit(name)
    return found


def _topological(edges: Mapping[str, Mapping[str, str]], order: list[str]) -> list[str]:
    done: list[str] = []
    remaining = list(order)
    while remaining:
        ready = next(n for n in remaining if all(d in done for d in edges[n]))
        done.append(ready)
        remaining.remove(ready)
    return done


# --- loading -------------------------------------------------------------------------------------


def shipped_specs() -> dict[str, str]:
    """Specs shipped in ``flows/specs/``: name → description."""
    found: dict[str, str] = {}
    for entry in sorted(SPEC_DIR.iterdir()):
        name, _, suffix = entry.name.rpartition(".")
        if suffix in ("yaml", "yml", "json") and entry.is_file():
            data = yaml.safe_load(entry.read_text(encoding="utf-8"))
            found[name] = str(data.get("description", "")).strip() if isinstance(data, dict) else ""
    return found


def load_pipeline(source: str | Path | Mapping[str, Any]) -> Pipeline:
    """Validate a spec given as a dict, inline YAML/JSON text, a file path, or a shipped spec's name.

    Raises:
        SpecError: the spec cannot be found, parsed or validated; nothing has been submitted.
    """
    label, data = _read(source)
    if not isinstance(data, Mapping):
        raise SpecError(
            [f"a spec is a mapping with 'steps:' (got {type(data).__name__})"], source=label
        )
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_pydantic_problems(exc, data), source=label) from None
    if label == "spec":
        label = f"spec '{spec.name}'"
    return compile_pipeline(spec, source=label)


def _read(source: str | Path | Mapping[str, Any]) -> tuple[str, Any]:
    if isinstance(source, Mapping):
        return "spec", source
    text: str
    label: str
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        text, label = source, "spec"
    else:
        path = _find_spec_file(str(source))
        text, label = path.read_text(encoding="utf-8"), f"spec {str(source)!r}"
    try:
        return label, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML/JSON"
        raise SpecError([f"cannot parse{at}: {problem}"], source=label) from None


def _find_spec_file(name: str) -> Path:
    for suffix in ("", ".yaml", ".yml", ".json"):
        candidate = SPEC_DIR / (name + suffix)
        if re.fullmatch(r"[A-Za-z0-9_.-]+", name) and candidate.is_file():
            return candidate
    path = Path(name).expanduser()
    if path.is_file():
        return path
    names = ", ".join(shipped_specs()) or "none"
    raise SpecError(
        [
            f"no spec file {name!r} and no shipped spec of that name (shipped: {names}); "
            "give a path to a .yaml/.json file, a shipped name, or inline YAML/JSON text"
        ],
        source=f"spec {name!r}",
    )


_FRIENDLY = {
    "name": "must be letters, digits, '_' or '-', starting with a letter or '_'",
    "endpoint": "must be a fal endpoint id like owner/model[/path], e.g. fal-ai/flux/schnell",
}


def _pydantic_problems(exc: ValidationError, data: Mapping[str, Any]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch" and loc and str(loc[-1]) in _FRIENDLY:
            message = _FRIENDLY[str(loc[-1])]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            raw = data.get("steps")
            entry = raw[loc[1]] if isinstance(raw, list) and loc[1] < len(raw) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            step = (
                f"step '{name}' (steps[{loc[1]}])" if isinstance(name, str) else f"steps[{loc[1]}]"
            )
            field = format_path([str(p) if not isinstance(p, int) else p for p in loc[2:]])
            problems.append(
                f"{step}, field '{field}': {message}" if field else f"{step}: {message}"
            )
        elif len(loc) >= 2 and loc[0] == "params":
            field = format_path([str(p) for p in loc[2:]])
            prefix = f"parameter '{loc[1]}'" + (f", field '{field}'" if field else "")
            problems.append(f"{prefix}: {message}")
        else:
            problems.append(f"field '{format_path([str(p) for p in loc])}': {message}")
    return problems


# --- running -------------------------------------------------------------------------------------


class PipelineFailed(RuntimeError):
    """A pipeline run ended with failed, skipped, unverified or undeleted requests (after cleanup).

    ``summary`` says which; what was archived was cleaned up all the same.
    """

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        super().__init__(summary.problem_text())

    def __reduce__(self) -> tuple[type[PipelineFailed], tuple[RunSummary]]:
        return (type(self), (self.summary,))


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

    def start(self, count: int) -> None:
        self.item_done = [anyio.Event() for _ in range(count)]
        self.outputs = [None] * count
        self.known.set()

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
                await scope.note_skipped(run.label(index), step.spec.endpoint, reason)
                run.settled.add(index)
                run.item_done[index].set()
            return
        async with anyio.create_task_group() as tg:
            for index in range(run.count):
                item = None if items is None else items[index]
                tg.start_soon(_run_item, run, index, item, source, ctx, scope)
    finally:
        run.done.set()


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
            await scope.note_skipped(run.label(index), step.spec.endpoint, run.broken[index])
            return
        item = source.outputs[index]
    try:
        arguments = render(step.arguments, Context(ctx.params, ctx.steps, item, index), "arguments")
    except RenderError as exc:
        run.broken[index] = f"not run: {exc}"
        await scope.note_skipped(run.label(index), step.spec.endpoint, run.broken[index])
        return
    # The arguments are part of the id: a re-run with the same run key resumes what it recorded,
    # and a changed request (other parameters) is a new request, not a stale resumed one.
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:8]
    job = Job(
        job_id=Job.make_id(scope.run_key, step.name, f"{index}-{digest}"),
        endpoint=step.spec.endpoint,
        arguments=arguments,
        policy=scope.policy_for(step.spec.endpoint, step.spec.retention),
    )
    run.job_ids[index] = job.job_id
    try:
        outcome = await scope.run(job, group=step.name)
        run.outputs[index] = outcome.output
    except Exception as exc:  # the scope has the record; siblings go on
        run.broken[index] = str(exc)


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
    (default: ``<spec name>-<flow run id>``). Returns the :class:`~flows.dag.RunSummary` as JSON.

    Raises:
        SpecError: invalid spec or parameters (nothing was submitted).
        PipelineFailed: some request failed, was skipped, or is left on fal (after cleanup).
    """
    pipeline = load_pipeline(spec)
    params = pipeline.bind(parameters)
    async with retention_scope(run_key=run_key or default_run_key(pipeline.spec.name)) as scope:
        await execute(pipeline, params, scope)
    summary = scope.summary
    assert summary is not None  # set by the scope's cleanup
    if not summary.ok:
        raise PipelineFailed(summary)
    return summary.model_dump(mode="json")
