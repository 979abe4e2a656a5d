"""Loading settings with errors that name the environment variable to fix."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from falflow.settings.models import Settings

_STANDARD_NAMES = {"fal_key": "FAL_KEY", "fal_admin_key": "FAL_ADMIN_KEY"}


class SettingsError(ValueError):
    """Invalid configuration. The message names each variable, what is wrong and what is allowed."""


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the field at ``loc`` (e.g. FALFLOW_BUCKET__URL)."""
    parts = [str(p) for p in loc]
    if not parts:
        return "settings"
    if parts[0] in _STANDARD_NAMES:
        return _STANDARD_NAMES[parts[0]]
    return "FALFLOW_" + "__".join(p.upper() for p in parts)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and ``.env``) once; keyword arguments win over both.

    Raises:
        SettingsError: listing every invalid variable, never echoing a secret's value.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"  {env_name(error['loc'])}: {message}")
        raise SettingsError(
            "invalid falflow settings:\n"
            + "\n".join(lines)
            + "\nFix the variables above (environment or .env) and run again."
        ) from None
