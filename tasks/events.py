"""The Prefect events falflow emits and listens for, so users can build automations on them.

- ``falflow.pipeline.requested`` (resource ``falflow.pipeline.<spec>``): asks the event-triggered
  deployment in ``prefect.yaml`` to run a pipeline; payload ``{spec, parameters, run_key}``.
- ``falflow.run.finished`` (resource ``falflow.run.<run key>``): a pipeline or janitor run is
  over; payload counts ``{submitted, archived, deleted, expiring, failed, unverified, unknown}``
  plus the run key and the flow name. Inside a flow run Prefect links the event to the flow run and deployment.

Neither event ever carries a key, a bucket credential or a fal URL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from prefect.events import Event, emit_event
from pydantic import BaseModel, ConfigDict

from falflow.tasks.models import JobRecord, JobState

PIPELINE_REQUESTED = "falflow.pipeline.requested"
RUN_FINISHED = "falflow.run.finished"


class RunCounts(BaseModel):
    """How many of a run's requests reached each point of ``submitted → archived → deleted``."""

    model_config = ConfigDict(frozen=True)

    submitted: int = 0
    """Requests fal accepted (they have a request id)."""
    archived: int = 0
    """Requests whose outputs are verified in the bucket (deleted ones included)."""
    deleted: int = 0
    """Requests whose payloads are gone from fal."""
    failed: int = 0
    """Requests fal answered with an error."""
    expiring: int = 0
    """Verified requests fal holds no payload of, whose leftover files are hidden until their TTL."""
    unverified: int = 0
    """Requests fal holds whose archive is not verified: left on fal, need attention."""
    unknown: int = 0
    """Submits whose answer was lost: fal may hold them (the janitor reconciles them)."""

    def __add__(self, other: RunCounts) -> RunCounts:
        return RunCounts(
            **{name: getattr(self, name) + getattr(other, name) for name in type(self).model_fields}
        )

    @classmethod
    def of(cls, records: Iterable[JobRecord]) -> RunCounts:
        submitted = archived = deleted = expiring = failed = unverified = unknown = 0
        for record in records:
            if record.request_id is None:
                unknown += record.submit_unknown
                continue
            submitted += 1
            archived += record.verified
            deleted += record.state is JobState.DELETED
            expiring += record.state is JobState.EXPIRING
            failed += record.state is JobState.FAILED
            unverified += record.unverified
        return cls(
            submitted=submitted,
            archived=archived,
            deleted=deleted,
            expiring=expiring,
            failed=failed,
            unverified=unverified,
            unknown=unknown,
        )


def emit_run_finished(
    run_key: str,
    counts: RunCounts,
    *,
    flow: str,
    status: str = "completed",
    extra: dict[str, Any] | None = None,
) -> Event | None:
    """Emit ``falflow.run.finished``; None when no Prefect API takes events.

    Call it at the end of a flow (after cleanup), also when the flow is about to fail, with
    ``status="failed"`` so an automation can alert on ``unverified > 0`` or on failures.
    """
    return emit_event(
        event=RUN_FINISHED,
        resource={
            "prefect.resource.id": f"falflow.run.{run_key}",
            "prefect.resource.name": run_key,
            "falflow.flow": flow,
        },
        payload={
            "run_key": run_key,
            "flow": flow,
            "status": status,
            **counts.model_dump(),
            **(extra or {}),
        },
    )


def request_pipeline(
    spec: str,
    parameters: dict[str, Any] | None = None,
    run_key: str | None = None,
    *,
    fal_credentials: str | None = None,
    bucket_block: str | None = None,
) -> Event | None:
    """Emit ``falflow.pipeline.requested``: the ``pipeline-on-event`` deployment runs ``spec``
    (with the fal keys and bucket of the blocks named, if any; see ``settings/blocks.py``).

    Without ``run_key`` the event id becomes the run key, so a re-emitted copy of the same event
    (same id) resumes the same run instead of submitting everything again.
    """
    event_id = uuid.uuid4()
    return emit_event(
        event=PIPELINE_REQUESTED,
        resource={
            "prefect.resource.id": f"falflow.pipeline.{spec}",
            "prefect.resource.name": spec,
        },
        payload={
            "spec": spec,
            "parameters": parameters or {},
            "run_key": run_key or f"event-{event_id.hex[:16]}",
            "fal_credentials": fal_credentials,
            "bucket_block": bucket_block,
        },
        id=event_id,
    )
