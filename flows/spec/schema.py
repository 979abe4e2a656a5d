"""The spec as written: pydantic models that refuse unknown fields and wrong types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from falflow.settings import RetentionOverride
from falflow.tasks.models import EndpointId

_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class SpecError(ValueError):
    """An invalid spec or parameter set. ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], *, source: str = "spec") -> None:
        self.problems = list(problems)
        super().__init__(
            f"invalid {source}:\n"
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
    endpoint: EndpointId
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
