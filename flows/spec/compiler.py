"""From a validated spec to a :class:`Pipeline`: references, fan-out shapes, cycles, step order."""

from __future__ import annotations

import graphlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from falflow.flows.spec.schema import (
    _PARAM_TYPES,
    PipelineSpec,
    RenderError,
    SpecError,
    StepSpec,
)
from falflow.flows.spec.templates import (
    Compiled,
    Context,
    Reference,
    Template,
    _strings,
    _templates,
    compile_value,
    parse_template,
    render,
)
from falflow.tasks.shape import ShapeError, check_shape


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
        try:
            check_shape(given)
        except ShapeError as exc:
            raise SpecError([f"parameters: {exc}"], source=self.source) from None
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
    """One message per cycle found, naming the steps and the fields that close it.

    Depth-first without recursion: a chain of thousands of steps written last step first is
    as deep as the search goes.
    """
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    found: list[str] = []
    for start in edges:
        if start in state:
            continue
        state[start] = 1
        path.append(start)
        pending = [iter(edges.get(start, {}))]
        while pending:
            needed = next(pending[-1], None)
            if needed is None:
                pending.pop()
                state[path.pop()] = 2
            elif state.get(needed) == 1:
                loop = [*path[path.index(needed) :], needed]
                fields = ", ".join(
                    f"step '{a}' field '{edges[a][b]}' needs '{b}'"
                    for a, b in itertools.pairwise(loop)
                )
                found.append(f"steps form a cycle {' → '.join(loop)} ({fields})")
            elif state.get(needed) is None:
                state[needed] = 1
                path.append(needed)
                pending.append(iter(edges.get(needed, {})))
    return found


def _topological(edges: Mapping[str, Mapping[str, str]], order: list[str]) -> list[str]:
    """``order`` rearranged so that every step comes after what it needs (the graph is acyclic)."""
    sorter = graphlib.TopologicalSorter({name: list(edges[name]) for name in order})
    return list(sorter.static_order())
