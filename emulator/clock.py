"""The emulator's clock: wall time plus an offset tests can move forward to reach expiries."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the emulator's clock only moves forward")
        self.offset += seconds


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def iso(timestamp: float) -> str:
    """ISO 8601 in UTC with a ``Z``, as fal writes it (microsecond resolution)."""
    return _utc(timestamp).isoformat().replace("+00:00", "Z")


def _parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def parse_iso(value: str) -> float:
    """A timestamp from ISO 8601 (date-only allowed; naive means UTC)."""
    return _parse(value).timestamp()


def micros(timestamp: float) -> int:
    """``timestamp`` in whole microseconds, rounded exactly as ``iso`` prints it, so that
    ``micros(t) == parse_iso_micros(iso(t))`` for every ``t``."""
    return (_utc(timestamp) - _EPOCH) // _MICROSECOND


def parse_iso_micros(value: str) -> int:
    """ISO 8601 (as ``parse_iso``) in whole microseconds (extra digits are truncated)."""
    return (_parse(value) - _EPOCH) // _MICROSECOND
