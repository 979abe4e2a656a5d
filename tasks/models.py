"""The records that move through falflow: a job to run, and its ledger record.

A request moves ``submitted → completed | failed → archived → deleted``. Every transition is
written to the ledger in the user's bucket before the next step starts, so a re-run resumes and the
janitor can audit. Nothing here ever holds a secret.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from falflow.settings import RetentionPolicy

JSON = dict[str, Any]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)+$"
"""A fal endpoint id, ``owner/model[/path]``: it becomes part of the queue URL, so no segment may
be empty or start with a dot (``..`` would reach another route of the queue host)."""

EndpointId = Annotated[str, StringConstraints(pattern=ENDPOINT_ID_PATTERN, max_length=200)]


def check_endpoint_id(endpoint: str) -> str:
    """``endpoint`` if it is a valid fal endpoint id.

    Raises:
        ValueError: saying what an endpoint id looks like.
    """
    if len(endpoint) > 200 or not re.fullmatch(ENDPOINT_ID_PATTERN, endpoint):
        raise ValueError(
            f"endpoint must be a fal endpoint id like owner/model[/path], e.g. fal-ai/flux/schnell "
            f"(got {endpoint[:80]!r})"
        )
    return endpoint


def utcnow() -> datetime:
    return datetime.now(UTC)


def safe_segment(text: str, *, max_length: int = 80) -> str:
    """A bucket-key segment derived from untrusted text: no separators, no dot-dot, bounded."""
    cleaned = _UNSAFE.sub("-", text).strip(".-")[:max_length]
    return cleaned or "x"


class JobState(StrEnum):
    PENDING = "pending"
    """Known to the flow, not yet submitted."""
    SUBMITTED = "submitted"
    SUBMIT_UNKNOWN = "submit_unknown"
    """The submit was sent but its answer was lost (timeout, reset, crash): fal may or may not
    have the request. Never re-sent blindly; reconciled through the Platform API listing."""
    NEVER_SUBMITTED = "never_submitted"
    """A submit whose answer was lost, proven never to have reached fal: its start deadline (and
    the listing's lag) passed and fal's listing shows no request with its input. fal never starts
    a request after its deadline, so the next run submits it again without a duplicate."""
    COMPLETED = "completed"
    FAILED = "failed"
    """fal answered COMPLETED with an error, or the request was cancelled/timed out."""
    ARCHIVED = "archived"
    """Every output file, input.json, output.json and archived.json are in the bucket, verified."""
    DELETE_UNCONFIRMED = "delete_unconfirmed"
    """Verified, and fal was asked to delete it, but the deletion is not confirmed: fal's listing
    still shows a stored payload (or does not show the request yet), or an output URL still
    serves. The next cleanup and the janitor try again (with a new idempotency key)."""
    EXPIRING = "expiring"
    """Verified; fal holds no JSON payload of it, and every output file left on fal is hidden
    and expires at ``expires_at`` (the media TTL): all that ``store_io = false`` allows."""
    DELETED = "deleted"
    """fal's payloads and output files are gone, confirmed by fal's listing and by every output
    URL no longer serving (``deletion.confirmed_at``)."""


VERIFIED_STATES = frozenset(
    {JobState.ARCHIVED, JobState.DELETE_UNCONFIRMED, JobState.EXPIRING, JobState.DELETED}
)
"""States whose archive is complete and verified: only these may be deleted from fal."""

TO_DELETE_STATES = frozenset({JobState.ARCHIVED, JobState.DELETE_UNCONFIRMED})
"""Verified, with fal's copy not yet confirmed gone: what a cleanup (or the janitor) deletes."""


class Job(BaseModel):
    """One fal request a flow wants made. ``job_id`` is stable across re-runs of the same run key."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    endpoint: str
    arguments: JSON
    policy: RetentionPolicy

    @staticmethod
    def make_id(run_key: str, step: str, index: int | str = 0) -> str:
        """A stable, key-safe id: the same run key, step and index always give the same id."""
        digest = hashlib.sha256(f"{run_key}\0{step}\0{index}".encode()).hexdigest()[:12]
        return f"{safe_segment(step, max_length=40)}-{safe_segment(str(index), max_length=20)}-{digest}"


def request_digest(endpoint: str, arguments: JSON) -> str:
    """A short hash of what a request asks for: identical requests have the same digest.

    Raises:
        TypeError: ``arguments`` are not JSON values.
    """
    try:
        canonical = json.dumps([endpoint, arguments], sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"arguments of {endpoint} must be JSON values: {exc}") from None
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def job_id_for(
    run_key: str,
    step: str,
    endpoint: str,
    arguments: JSON,
    *,
    item: int | None = None,
    occurrence: int = 0,
) -> str:
    """The job id of a request: the same run key and request give the same id on every re-run,
    so a resumed run finds its ledger records and submits nothing twice.

    A spec item (``item`` = its index in the step) is named by step, index and a hash of its
    arguments; a Python step by step and :func:`request_digest`, ``occurrence`` counting the
    identical requests made before it in the run. Changed arguments make a new request.

    Raises:
        TypeError: ``arguments`` are not JSON values.
    """
    if item is None:
        digest = request_digest(endpoint, arguments)
        return Job.make_id(run_key, step, f"{digest}-{occurrence}" if occurrence else digest)
    try:
        canonical = json.dumps(arguments, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"arguments of {step!r} must be JSON values: {exc}") from None
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    return Job.make_id(run_key, step, f"{item}-{digest}")


class ArchivedObject(BaseModel):
    """One output file copied into the bucket and verified."""

    source_url: str
    """The fal CDN URL it came from (public, holds no secret)."""
    key: str
    """Its key in the bucket, relative to the bucket URL."""
    size: int
    sha256: str
    content_type: str | None = None
    store_etag: str | None = None
    """The store's own tag for what it stored, as its answer to the upload gave it (S3: an MD5
    of the object or of its parts; others: a version). obstore returns no store-side SHA-256,
    so ``sha256`` (falflow's, of the bytes downloaded) is the content hash."""


class DeletionResult(BaseModel):
    """One attempt at deleting a request from fal: fal's answer and what was checked after it."""

    at: datetime = Field(default_factory=utcnow)
    attempt: int = 1
    """Deliberate attempts so far; each sends a new ``Idempotency-Key`` (a replayed answer to an
    old key is not a retry)."""
    idempotency_key: str | None = None
    status_code: int
    already_gone: bool = False
    """Kept for ledgers written before deletions were confirmed (fal answered 404)."""
    cdn_delete_results: list[JSON] = Field(default_factory=list)
    listing: str | None = None
    """What fal's request listing showed afterwards: ``no stored payload``, ``payload stored``
    or ``not listed`` (yet)."""
    urls: dict[str, str] = Field(default_factory=dict)
    """Each output URL and what a HEAD of it answered afterwards (``404``, ``200``, …)."""
    hidden: list[str] = Field(default_factory=list)
    """Output URLs falflow set to ``hide`` because fal could not delete them."""
    confirmed_at: datetime | None = None
    """Set only when the listing shows no stored payload and no output URL serves."""
    problem: str | None = None
    """Why this attempt did not confirm the deletion (None once confirmed)."""


class JobRecord(BaseModel):
    """The ledger record of one job: a small JSON document, one per request, in the bucket."""

    job_id: str
    run_key: str
    endpoint: str
    state: JobState = JobState.PENDING
    request_id: str | None = None
    policy: RetentionPolicy
    headers_sent: dict[str, str] = Field(default_factory=dict)
    """The retention headers attached to the submit (never the Authorization header)."""
    submit_attempted_at: datetime | None = None
    """Set (and written) just before the submit POST: a record with this and no request id means
    the outcome of that submit is unknown, so it must be reconciled, never blindly re-sent."""
    submitted_at: datetime | None = None
    finished_at: datetime | None = None
    archived_at: datetime | None = None
    deleted_at: datetime | None = None
    expires_at: datetime | None = None
    """When fal's lifecycle removes what is left of an ``expiring`` request (its hidden files)."""
    error_type: str | None = None
    error: str | None = None
    cancel_requested_at: datetime | None = None
    """When falflow asked fal to cancel the request (its run was cancelled or broke off while
    waiting). If fal then fails it as cancelled, nothing was generated and it is falflow's doing,
    not the model's: the run's resume submits the job again (:mod:`falflow.tasks.jobs`)."""
    objects: list[ArchivedObject] = Field(default_factory=list)
    input_key: str | None = None
    output_key: str | None = None
    archived_output_key: str | None = None
    error_key: str | None = None
    """``error.json`` in the bucket: fal's error answer and status (with its logs) of a failed
    request. With ``input.json`` it is all there is to archive of one."""
    deletion: DeletionResult | None = None
    reserved_inputs: dict[str, str] = Field(default_factory=dict)
    """Input fal URLs that were gone from fal when this request was submitted, and the fresh
    upload of the archived copy submitted in their place."""
    history: list[tuple[JobState, datetime]] = Field(default_factory=list)

    @property
    def archived_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def verified(self) -> bool:
        """True once the archive is complete and verified: only then may fal's copy be deleted."""
        return self.state in VERIFIED_STATES

    @property
    def needs_deletion(self) -> bool:
        """fal still holds it, and everything of it is safely in the bucket: delete it from fal.
        A verified archive not yet confirmed gone, or a failed request whose input and error are
        archived (unless its policy keeps failures on fal)."""
        if self.state in TO_DELETE_STATES:
            return True
        return (
            self.state is JobState.FAILED
            and self.request_id is not None
            and self.input_key is not None
            and self.error_key is not None
            and not self.policy.keep_failed_on_fal
            and (self.deletion is None or self.deletion.confirmed_at is None)
        )

    @property
    def unverified(self) -> bool:
        """fal holds this request but its archive is not verified: never deleted, needs attention."""
        return self.request_id is not None and self.state in (
            JobState.SUBMITTED,
            JobState.COMPLETED,
        )

    @property
    def submit_unknown(self) -> bool:
        """A submit was sent and its answer lost: fal may or may not hold the request."""
        return self.request_id is None and (
            self.state is JobState.SUBMIT_UNKNOWN
            or (self.state is JobState.PENDING and self.submit_attempted_at is not None)
        )

    def moved_to(self, state: JobState, **changes: Any) -> JobRecord:
        """A copy in ``state`` with the transition appended to its history."""
        now = utcnow()
        return self.model_copy(
            update={**changes, "state": state, "history": [*self.history, (state, now)]}
        )
