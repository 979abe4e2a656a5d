"""Reading a spec: a dict, inline YAML/JSON, a file, or a shipped spec's name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from falflow.flows.spec.compiler import (
    Pipeline,
    compile_pipeline,
)
from falflow.flows.spec.schema import (
    PipelineSpec,
    SpecError,
)
from falflow.tasks.paths import format_path
from falflow.tasks.shape import ShapeError, check_shape

SPEC_DIR = Path(__file__).parent.parent / "specs"
"""The shipped specs (``falflow specs`` lists them; package data of ``falflow.flows``)."""
MAX_DOCUMENT_BYTES = 16 * 1024**2
"""Largest spec or parameters file read (a deployment may take either from an event)."""


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
        SpecError: the spec cannot be found, read, parsed or validated, or is nested too deeply
            or too large; nothing has been submitted.
    """
    if isinstance(source, Mapping):
        label, data = "spec", source
        _check_shape(data, label)
    elif isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        label, data = "spec", read_document(source, "spec")
    else:
        path = _find_spec_file(str(source))
        label = f"spec {str(source)!r}"
        data = read_document(read_text_file(path, label), label)
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


def read_text_file(path: Path, label: str) -> str:
    """A spec or parameters file as text: UTF-8, at most :data:`MAX_DOCUMENT_BYTES`.

    Raises:
        SpecError: naming the file when it cannot be read, is too large or is not UTF-8.
    """
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"cannot read {path}: {exc.strerror or exc}"], source=label) from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SpecError(
            [f"{path} is larger than {MAX_DOCUMENT_BYTES // 1024**2} MiB"], source=label
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            [
                f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                "save it as UTF-8"
            ],
            source=label,
        ) from None


def read_document(text: str, label: str) -> Any:
    """Parse YAML/JSON ``text`` and check its shape (:func:`~falflow.tasks.shape.check_shape`).

    Raises:
        SpecError: the text is too large, not YAML/JSON, nested too deeply or expands too far.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise SpecError([f"larger than {MAX_DOCUMENT_BYTES // 1024**2} MiB"], source=label)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML/JSON"
        raise SpecError([f"cannot parse{at}: {problem}"], source=label) from None
    except RecursionError:  # PyYAML composes nested blocks recursively
        raise SpecError(
            ["cannot parse: nested far deeper than a spec or parameters may be"], source=label
        ) from None
    _check_shape(data, label)
    return data


def _check_shape(data: Any, label: str) -> None:
    try:
        check_shape(data)
    except ShapeError as exc:
        raise SpecError([str(exc)], source=label) from None


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
