"""Reading a spec: a dict, inline YAML/JSON, a file, or a shipped spec's name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from falflow.flows.paths import format_path
from falflow.flows.spec.compiler import (
    Pipeline,
    compile_pipeline,
)
from falflow.flows.spec.schema import (
    PipelineSpec,
    SpecError,
)

SPEC_DIR = Path(__file__).parent.parent / "specs"
"""The shipped specs (``falflow specs`` lists them; package data of ``falflow.flows``)."""


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
