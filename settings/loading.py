"""Loading settings with errors that name the environment variable to fix."""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic_settings
from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

from falflow.settings.models import Settings

_STANDARD_NAMES = {"fal_key": "FAL_KEY", "fal_admin_key": "FAL_ADMIN_KEY"}
_PREFIX = "FALFLOW_"


class SettingsError(ValueError):
    """Invalid configuration. The message names each variable, what is wrong and what is allowed."""


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the field at ``loc`` (e.g. FALFLOW_BUCKET__URL)."""
    parts = [str(p) for p in loc]
    if not parts:
        return "settings"
    if parts[0] in _STANDARD_NAMES:
        return _STANDARD_NAMES[parts[0]]
    return _PREFIX + "__".join(p.upper() for p in parts)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and ``.env``) once; keyword arguments win over both.

    Every ``FALFLOW_*`` variable must name a setting: a misspelt one is an error naming the
    closest valid name, not a silent fallback to the default.

    Raises:
        SettingsError: listing every invalid or unknown variable at once, never echoing a
            secret's value.
    """
    env_file = Path(overrides.get("_env_file", Settings.model_config.get("env_file")) or ".env")
    variables = _variables(env_file)
    lines = list(_check_variables(variables))
    settings: Settings | None = None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = env_name(error["loc"])
            if error["type"] == "extra_forbidden" and name in variables:
                continue  # reported above with the closest valid name
            lines.append(f"  {name}: {error['msg'].removeprefix('Value error, ')}")
    except pydantic_settings.SettingsError as exc:
        if not lines:  # a JSON value _check_variables did not foresee
            lines.append(f"  {exc}")
    if lines or settings is None:
        raise SettingsError(
            "invalid falflow settings:\n"
            + "\n".join(lines)
            + "\nFix the variables above (environment or .env) and run again."
        )
    return settings


def _variables(env_file: Path) -> dict[str, tuple[str, str | None]]:
    """``FALFLOW_*`` variables by upper-case name → where they come from and their value (the
    environment wins over ``.env``, as for the settings themselves).

    Raises:
        SettingsError: the ``.env`` file cannot be read as UTF-8 text.
    """
    found: dict[str, tuple[str, str | None]] = {}
    if env_file.is_file():
        try:
            values = dotenv_values(env_file, encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = env_file.read_bytes()[: exc.start].count(b"\n") + 1
            raise SettingsError(
                f"invalid falflow settings:\n  {env_file}: not UTF-8 text (byte "
                f"0x{exc.object[exc.start]:02x} on line {line}); save it as UTF-8 and run again"
            ) from None
        found.update({name.upper(): (str(env_file), value) for name, value in values.items()})
    found.update({name.upper(): ("environment", value) for name, value in os.environ.items()})
    return {name: where for name, where in found.items() if name.startswith(_PREFIX)}


def _check_variables(variables: Mapping[str, tuple[str, str | None]]) -> Iterator[str]:
    exact, prefixes = _known_names()
    candidates = [name for name, kind in exact.items() if kind != "section"]
    for name, (where, value) in sorted(variables.items()):
        if name in exact:
            if exact[name] != "scalar" and value is not None:
                yield from _check_json(name, where, value)
            continue
        if any(name.startswith(prefix) for prefix in prefixes):
            continue
        bare = name.removeprefix(_PREFIX)
        close = [n for n in _STANDARD_NAMES.values() if n == bare] or difflib.get_close_matches(
            name, candidates, n=1, cutoff=0.8
        )
        hint = f"did you mean {close[0]}?" if close else "see the settings in the README"
        yield (
            f"  {name} ({where}): not a falflow setting; {hint} (unknown FALFLOW_ variables "
            "are refused so that a typo cannot fall back to a default)"
        )


def _check_json(name: str, where: str, raw: str) -> Iterator[str]:
    """A structured setting (a list, a mapping, a whole section) is JSON: say so by name."""
    try:
        json.loads(raw)
    except json.JSONDecodeError as exc:
        yield (
            f"  {name} ({where}): not valid JSON ({exc.msg} at column {exc.colno}); it takes a "
            "JSON list or object, e.g. "
            + (
                '\'{"fal-ai/*": {"media_ttl_seconds": 3600}}\''
                if name.endswith("__OVERRIDES")
                else '\'["a", "b"]\''
            )
        )


def _known_names() -> tuple[dict[str, Literal["scalar", "json", "section"]], tuple[str, ...]]:
    """Every ``FALFLOW_*`` name the models define → its kind (a section and a list or mapping
    take JSON); and the prefixes under which any name is allowed (a mapping's keys, e.g.
    ``FALFLOW_RETENTION__OVERRIDES__…``)."""
    exact: dict[str, Literal["scalar", "json", "section"]] = {}
    prefixes: list[str] = []

    def visit(model: type[BaseModel], prefix: str) -> None:
        for field_name, field in model.model_fields.items():
            if field_name in _STANDARD_NAMES:
                continue
            name = prefix + field_name.upper()
            annotation = _unwrap(field.annotation)
            origin = typing.get_origin(annotation) or annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                exact[name] = "section"
                visit(annotation, name + "__")
            elif origin in (dict, list, tuple, set, frozenset):
                exact[name] = "json"
                if origin is dict:
                    prefixes.append(name + "__")
            else:
                exact[name] = "scalar"

    visit(Settings, _PREFIX)
    return exact, tuple(prefixes)


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation
