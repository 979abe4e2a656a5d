"""The emulator's configuration: pydantic models, settable at start and at runtime.

Where fal's behaviour is unknown (see docs/fal-protocol.md), the emulator's choice is a field here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]

DAY = 24 * 3600.0


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
    lost_submit_answer: Probability = 0.0
    """Submits that are queued but whose answer is lost (connection dropped): the client retries
    and a second, orphaned request exists, as on fal after a read timeout."""
    seed: int = 0


class EmulatorConfig(BaseModel):
    """Everything the emulator can be told. Durations are in seconds of the emulator's clock,
    which tests can move forward (``RunningEmulator.advance_clock``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    api_key: str = "emulator-key"
    """Accepted on the queue, REST and listing; ``Authorization: Key <api_key>``."""
    admin_key: str = "emulator-admin-key"
    """Also required by the Platform API's payload deletion."""
    user_id: str = "emulator-user"
    """Sent as ``X-Fal-Webhook-User-Id``."""

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

    default_expiration_seconds: Annotated[int, Field(ge=1)] | None = None
    """Account default lifetime of CDN files sent without a lifecycle header (None: forever)."""
    result_retention_seconds: Seconds = 3600.0
    """Result kept after completion when ``X-Fal-Store-IO: 0``..."""
    large_result_retention_seconds: Seconds = 360.0
    """...or this long when the result is ``large_result_bytes`` or more."""
    large_result_bytes: Annotated[int, Field(ge=1)] = 10 * 1024
    payload_retention_seconds: Seconds = 30 * DAY
    """Stored input/output JSON (and so the result) kept this long after completion."""
    idempotency_ttl_seconds: Seconds = 600.0
    cdn_token_ttl_seconds: Annotated[float, Field(gt=0)] = 3600.0

    webhook_attempts: Annotated[int, Field(ge=1)] = 3
    webhook_retry_seconds: Seconds = 1.0
    """First delay between delivery attempts; it doubles each time."""
    webhook_timeout_seconds: Annotated[float, Field(gt=0)] = 15.0

    v3_upload_available: bool = True
    """False makes ``/cdn/files/upload`` fail (500) so clients fall back to
    ``/rest/storage/upload/initiate``."""
    stream_keepalive_seconds: Annotated[float, Field(gt=0)] = 1.0
    """The status stream repeats the status at least this often while waiting."""

    faults: Faults = Field(default_factory=Faults)

    def latency_for(self, endpoint_id: str) -> float:
        return self.model_latency.get(endpoint_id, self.latency_seconds)
