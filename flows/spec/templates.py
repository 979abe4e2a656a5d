"""``{{ … }}`` templates: parsed once, rendered against parameters, earlier steps and the current item."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from falflow.flows.spec.schema import (
    RenderError,
)
from falflow.tasks.paths import PathSegment, format_path, get_path, parse_path

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
