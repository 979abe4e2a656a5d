"""Bounds on the JSON values falflow walks: specs, parameters and fal's outputs.

Python's recursion stops near 1,000 levels and YAML aliases can make a 500-byte document expand
to a billion values, so every value from outside is measured first, without recursion and
without expanding more than the bound, and refused with the place where it went too far.
"""

from __future__ import annotations

from typing import Any

from falflow.tasks.paths import format_path

MAX_DEPTH = 64
"""Nesting levels a spec, a parameter set or an output may have (real ones have under ten)."""
MAX_VALUES = 1_000_000
"""Values (strings, numbers, list items, keys) one document may expand to."""


class ShapeError(ValueError):
    """A value nested too deeply or too large; the message says where."""


def check_shape(value: Any, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> None:
    """Raise :class:`ShapeError` if ``value`` nests deeper than ``max_depth`` or holds more than
    ``max_values`` values (shared sub-values, as YAML aliases make them, count every time).

    Work is bounded by ``max_values`` whatever the value, and nothing recurses.
    """
    count = 0
    # (value, depth, path): the path is a linked (parent, segment) chain, built only on demand
    stack: list[tuple[Any, int, tuple[Any, Any] | None]] = [(value, 0, None)]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > max_values:
            raise ShapeError(
                f"expands to more than {max_values:,} values (at {_where(path)}); "
                "YAML aliases that repeat large blocks count every time they are used"
            )
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, list | tuple):
            children = enumerate(node)
        else:
            continue
        if depth >= max_depth and node:
            raise ShapeError(f"nested deeper than {max_depth} levels (at {_where(path)})")
        for key, child in children:
            stack.append((child, depth + 1, (path, key)))


def _where(path: tuple[Any, Any] | None) -> str:
    segments: list[str | int] = []
    while path is not None:
        path, segment = path
        segments.append(segment if isinstance(segment, int) else str(segment))
    segments.reverse()
    if len(segments) > 8:
        return (
            format_path(segments[:4])
            + f"…({len(segments) - 8} more levels)…"
            + format_path(segments[-4:])
        )
    return format_path(segments) or "the top"
