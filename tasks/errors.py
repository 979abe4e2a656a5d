"""Errors a job raises, and the rendering of fal's error bodies into one readable line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from falflow.tasks.models import JobRecord

_MAX_MESSAGE = 500
SHOWN_PROBLEMS = 3
"""Problems spelled out in one error text; the rest are counted (the ledger keeps each record)."""


class JobFailed(Exception):
    """A job did not produce an output: fal failed it, refused it, or its outcome is unknown.

    ``record`` is its ledger record as written (``error_type`` and ``error`` say what happened;
    ``state`` says where it stopped: ``failed``, ``submit_unknown``, or ``submitted`` when the
    wait itself broke and a re-run can resume it).
    """

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        where = f" (request {record.request_id})" if record.request_id else ""
        super().__init__(
            f"job {record.job_id} on {record.endpoint}{where} failed: "
            f"{record.error_type or 'error'}: {record.error or 'no details'}"
        )

    def __reduce__(self) -> tuple[type[JobFailed], tuple[JobRecord]]:
        return (type(self), (self.record,))


def describe_detail(detail: Any) -> str:
    """fal's ``detail`` (text, or a list of ``{loc, msg, type}``) as one bounded line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc") or [])
                kind = f" ({item['type']})" if item.get("type") else ""
                parts.append(f"{loc + ': ' if loc else ''}{item.get('msg', item)}{kind}")
            else:
                parts.append(str(item))
        text = "; ".join(parts)
    else:
        text = str(detail)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


def detail_type(detail: Any) -> str | None:
    """The ``type`` of the first entry of a validation-style ``detail`` list, if any."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        kind = detail[0].get("type")
        return str(kind) if kind else None
    return None


def join_bounded(problems: Sequence[str], *, shown: int = SHOWN_PROBLEMS) -> str:
    """The first ``shown`` problems and a count of the rest, as one line: an error text (in the
    ledger, a log line, the Prefect database) stays readable however many problems there are."""
    rest = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; … and {rest:,} more" if rest > 0 else "")
