"""Paths into JSON values (``images[0].url``), shared by ``ref()`` and the spec templates."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

PathSegment = str | int

_SEGMENT = re.compile(
    r"\.?(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"
    r"|\[(?P<index>-?\d+)\]"
    r"|\[\"(?P<dq>[^\"]*)\"\]"
    r"|\['(?P<sq>[^']*)'\]"
)


def parse_path(text: str) -> tuple[PathSegment, ...]:
    """``images[0].url`` → ``("images", 0, "url")``; ``["odd key"]`` quotes any other key.

    Raises:
        ValueError: naming the position where the path stops making sense.
    """
    segments: list[PathSegment] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _SEGMENT.match(text, position)
        if match is None or (match.group("name") and position and text[position] != "."):
            raise ValueError(
                f"bad path {text!r} at {text[position:]!r}: "
                'use names, [0]-style indexes and ["quoted keys"], e.g. images[0].url'
            )
        if match.group("name") is not None:
            segments.append(match.group("name"))
        elif match.group("index") is not None:
            segments.append(int(match.group("index")))
        else:
            segments.append(
                match.group("dq") if match.group("dq") is not None else match.group("sq")
            )
        position = match.end()
    return tuple(segments)


def format_path(path: Sequence[PathSegment]) -> str:
    out = ""
    for segment in path:
        if isinstance(segment, int):
            out += f"[{segment}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", segment):
            out += f".{segment}" if out else segment
        else:
            out += f'["{segment}"]'
    return out


def get_path(value: Any, path: Sequence[PathSegment]) -> Any:
    """The value at ``path``.

    Raises:
        LookupError: naming the segment that is missing and what is there instead.
    """
    for depth, segment in enumerate(path):
        where = format_path(path[:depth]) or "the value"
        if isinstance(segment, int):
            if not isinstance(value, list):
                raise LookupError(f"{where} is {_kind(value)}, not a list: cannot take [{segment}]")
            if not -len(value) <= segment < len(value):
                raise LookupError(f"{where} has {len(value)} items: no [{segment}]")
            value = value[segment]
        else:
            if not isinstance(value, dict):
                raise LookupError(f"{where} is {_kind(value)}, not an object: no key {segment!r}")
            if segment not in value:
                keys = ", ".join(sorted(map(str, value))) or "none"
                raise LookupError(f"{where} has no key {segment!r} (keys: {keys})")
            value = value[segment]
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )
