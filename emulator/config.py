"""The emulator's configuration: pydantic models, settable at start and at runtime.

Where fal's behaviour is unknown (see docs/fal-protocol.md), the emulator's choice is a field here.
Where fal's published contract is silent, the default is the *harsher* reading: the one under
which a careless client would leave data on fal while believing it deleted. The friendlier
reading stays available behind the field, so a benchmark can opt in.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]

DAY = 24 * 3600.0

AclDecision = Literal["allow", "forbid", "hide"]


class AclRule(BaseModel):
    """One per-user override of a file's ACL (Platform API ``/storage/files/acl``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    user: Annotated[str, Field(min_length=1)]
    decision: AclDecision


class Acl(BaseModel):
    """A CDN file's access control list: ``default`` for everyone, ``rules`` per user.

    The emulator's CDN identifies nobody, so its downloads always get ``default``: ``allow``
    serves the file, ``forbid`` answers 403, ``hide`` answers 404 (a hidden file looks gone).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    default: AclDecision
    rules: list[AclRule] = Field(default_factory=list)


PUBLIC = Acl(default="allow")
"""What a file without an ACL reports (the system default)."""


class StorageSettings(BaseModel):
    """The account's storage settings (Platform API ``/storage/settings``): the lifetime and
    initial ACL of new CDN files whose request or upload does not choose them. None: never
    expire / the system default (public)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    expiration_duration_seconds: Annotated[int, Field(ge=1)] | None = None
    initial_acl: Acl | None = None


class Faults(BaseModel):
    """Injected failures, each a probability per answer, drawn from an RNG seeded with ``seed``.

    Setting faults (at start or at runtime) reseeds the RNG, so a test sees the same sequence of
    faults for the same sequence of calls.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_limit_429: Probability = 0.0
    """Queue API calls answered 429 (``fal_client`` retries them)."""
    ingress_503: Probability = 0.0
    """Any fal call answered 503 by the "proxy": no ``x-fal-request-id``, ``nginx`` in the body."""
    connection_reset: Probability = 0.0
    """Any fal call whose connection is dropped before an answer is sent."""
    truncated_download: Probability = 0.0
    """CDN downloads that announce the full ``Content-Length`` and stop half-way."""
    slow_answer: Probability = 0.0
    """Any fal call answered only after ``slow_seconds``."""
    slow_seconds: Seconds = 1.0
    model_error: Probability = 0.0
    """Submitted requests whose runner fails: COMPLETED with a 500 ``runner_server_error``."""
    runner_retry: Probability = 0.0
    """Submitted requests whose first runner fails with a 503 and that the queue re-runs (fal
    re-queues runner failures): the request runs twice, then completes normally, under a new
    ``gateway_request_id``."""
    lost_submit_answer: Probability = 0.0
    """Submits that are queued but whose answer is lost (connection dropped): the client retries
    and a second, orphaned request exists, as on fal after a read timeout."""
    partial_cdn_delete: Probability = 0.0
    """Payload deletions (of a request with output files) in which one output file fails: its
    ``cdn_delete_results`` entry carries an ``exception`` and the file stays served."""
    empty_delete_results: Probability = 0.0
    """Payload deletions answered 200 ``{"cdn_delete_results": []}`` that delete nothing at all
    (payloads and files stay)."""
    seed: int = 0


class EmulatorConfig(BaseModel):
    """Everything the emulator can be told. Durations are in seconds of the emulator's clock,
    which tests can move forward (``RunningEmulator.advance_clock``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    api_key: str = "emulator-key"
    """Accepted on the queue, REST and every Platform API operation;
    ``Authorization: Key <api_key>``."""
    admin_key: str = "emulator-admin-key"
    """Accepted everywhere too, and the only key the Platform API's payload deletion accepts."""
    user_id: str = "emulator-user"
    """Sent as ``X-Fal-Webhook-User-Id``; also a user that ACL rules may name."""

    latency_seconds: Seconds = 0.05
    """Run time of every simulated model (time IN_PROGRESS)."""
    model_latency: dict[str, Seconds] = Field(default_factory=dict)
    """Per endpoint id overrides of ``latency_seconds``."""
    video_size_bytes: Annotated[int, Field(ge=64)] = 2 * 1024 * 1024
    """Size of the image-to-video output (served streamed; 1 GiB is fine)."""
    blocked_word: str = "forbidden"
    """A prompt containing it fails with 422 ``content_policy_violation``."""

    concurrency_limit: Annotated[int, Field(ge=1)] | None = None
    """Account limit on IN_PROGRESS requests; the rest wait IN_QUEUE. None: unlimited."""
    platform_rate_per_second: Annotated[float, Field(gt=0)] | None = None
    """Token-bucket rate of the Platform API (``/v1``); None: unlimited."""
    platform_burst: Annotated[int, Field(ge=1)] | None = None
    """Bucket size; None: one second's worth of the rate (at least 1)."""
    platform_retry_after: bool = False
    """A Platform API 429 carries ``Retry-After: <seconds>``. Off by default: the spec declares
    no rate-limit header, so a client must back off without one."""
    platform_ratelimit_reset: bool = False
    """A Platform API 429 carries ``x-ratelimit-reset: <seconds>`` (another header a client
    might meet instead of ``Retry-After``)."""

    default_expiration_seconds: Annotated[int, Field(ge=1)] | None = None
    """Seeds the account storage setting ``expiration_duration_seconds`` (at start, on reset and
    whenever this field is set): the lifetime of new CDN files (outputs and uploads) sent
    without one in their lifecycle header. None: forever. At runtime the account settings
    (``PUT /v1/storage/settings``) are the source of truth."""
    default_initial_acl: Acl | None = None
    """Seeds the account storage setting ``initial_acl`` the same way: the ACL of new CDN files
    whose lifecycle header does not name one. None: no ACL (public). An explicit
    ``"initial_acl": null`` in a lifecycle header also means public, not the account's."""
    acl_known_users: list[str] = Field(default_factory=list)
    """Users ACL rules may name besides ``user_id``; rules for anyone else are dropped, as fal
    drops rules for users that do not exist."""
    runner_reads_restricted_inputs: bool = False
    """Models read input files whatever their ACL. Off by default: a runner fetches an input URL
    like anyone else, so a ``forbid``/``hide`` input fails with ``file_download_error`` unless
    it is a signed URL."""

    result_retention_seconds: Seconds = 3600.0
    """Result kept after completion when ``X-Fal-Store-IO: 0``..."""
    large_result_retention_seconds: Seconds = 360.0
    """...or this long when the result is ``large_result_bytes`` or more."""
    large_result_bytes: Annotated[int, Field(ge=1)] = 10 * 1024
    payload_retention_seconds: Seconds = 30 * DAY
    """Stored input/output JSON (and so the result) kept this long after completion."""

    payload_row_delay_seconds: Seconds = 1.0
    """For this long after a request completes its payload record is "not written yet": payload
    deletion answers 404 ``not_found`` and deletes nothing. 0: deletable at once."""
    store_io_off_deletes_files: bool = False
    """Payload deletion of a request sent with ``X-Fal-Store-IO: 0`` deletes its output files
    (and its result). Off by default: such a request has no stored output in which to find its
    files, so the deletion answers 200 ``{"cdn_delete_results": []}``, deletes nothing, and the
    files stay until their lifecycle expiry (the result until its retention)."""
    redelete_retries_failed_files: bool = False
    """Deleting a request's payloads again retries its output files whose deletion failed
    (``partial_cdn_delete``). Off by default: once the payloads are gone a second deletion
    finds no files and answers an empty ``cdn_delete_results``; the failed file stays."""
    idempotency_ttl_seconds: Seconds = 600.0
    """How long a payload deletion's answer (errors included) is replayed for its
    ``Idempotency-Key``."""

    listing_includes_unstarted: bool = False
    """The request listing and search show requests that have not started (``started_at:
    null``). Off by default: the spec requires ``started_at``, so a request is not listed until
    it starts, and one that never starts (cancelled or timed out in the queue) never is."""
    listing_lag_seconds: Seconds = 2.0
    """The listing and search show requests as they were this long ago: a request appears this
    long after it started, and its completion (``ended_at``, ``status_code``, ``duration``,
    ``json_output``) this long after it ended. 0: at once."""
    search_max_limit: Annotated[int, Field(ge=1)] = 50
    """Search answers at most this many results per page, whatever ``limit`` asks for (the
    spec: "actual maximum depends on query type")."""

    cdn_token_ttl_seconds: Annotated[float, Field(gt=0)] = 3600.0

    webhook_attempts: Annotated[int, Field(ge=1)] = 3
    webhook_retry_seconds: Seconds = 1.0
    """First delay between delivery attempts; it doubles each time."""
    webhook_timeout_seconds: Annotated[float, Field(gt=0)] = 15.0
    webhook_gateway_id_header: bool = True
    """A delivery for a request whose ``gateway_request_id`` differs from its ``request_id``
    (it was retried, see ``Faults.runner_retry``) carries, and is signed with, the gateway id in
    ``X-Fal-Webhook-Request-Id``; the body has both ids. False: always the request id."""
    always_new_gateway_id: bool = False
    """Every request gets a ``gateway_request_id`` of its own (in the submit answer, webhook body
    and, with ``webhook_gateway_id_header``, the delivery header), as if each were retried."""

    v3_upload_available: bool = True
    """False makes ``/cdn/files/upload`` fail (500) so clients fall back to
    ``/rest/storage/upload/initiate``."""
    stream_keepalive_seconds: Annotated[float, Field(gt=0)] = 1.0
    """The status stream repeats the status at least this often while waiting."""

    faults: Faults = Field(default_factory=Faults)

    def latency_for(self, endpoint_id: str) -> float:
        return self.model_latency.get(endpoint_id, self.latency_seconds)

    def seed_storage_settings(self) -> StorageSettings:
        return StorageSettings(
            expiration_duration_seconds=self.default_expiration_seconds,
            initial_acl=self.default_initial_acl,
        )
