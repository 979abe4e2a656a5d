"""falflow's configuration models: the only place configuration is read.

Every value comes from the environment (prefix ``FALFLOW_``, ``__`` between nested names), from a
``.env`` file, or from keyword arguments; ``FAL_KEY`` and ``FAL_ADMIN_KEY`` keep their standard
names. Secrets are ``SecretStr`` so they never print.

Example:
    ```python
    from falflow.settings import load_settings

    settings = load_settings()  # raises SettingsError naming the variable on bad input
    settings.retention.policy_for("fal-ai/flux/dev").media_ttl_seconds
    ```
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_MEDIA_TTL_SECONDS = 60
"""fal treats 0 as "never"; below a minute the archive could lose the race with expiry."""

BUCKET_SCHEMES = ("file", "s3", "gs", "az", "memory")

Priority = Literal["normal", "low"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionOverride(_Model):
    """Per-endpoint changes to the retention policy; unset fields keep the default."""

    media_ttl_seconds: int | None = Field(default=None)
    never_expire: bool = False
    store_io: bool | None = None
    priority: Priority | None = None
    start_timeout_seconds: float | None = None
    private_outputs: bool | None = None
    keep_failed_on_fal: bool | None = None

    @field_validator("media_ttl_seconds", mode="before")
    @classmethod
    def _ttl_floor(cls, value: object) -> object:
        return _check_ttl(value)

    @model_validator(mode="after")
    def _store_io_needs_expiry(self) -> RetentionOverride:
        _check_expiry(
            self.store_io is not False,
            None if self.never_expire else 0,
            "store_io: false",
            "never_expire: true",
        )
        return self


class RetentionPolicy(_Model):
    """What falflow asks fal to keep, and for how long, for one endpoint."""

    media_ttl_seconds: int | None = 7 * 24 * 3600
    """Lifetime of the CDN files a request produces (None: never expire). The safety net if a
    run dies before cleanup; cleanup deletes them as soon as the archive is verified."""
    store_io: bool = True
    """Keep the request's JSON input/output on fal (``X-Fal-Store-IO``) until cleanup deletes it.
    On by default so the janitor can still recover a crashed run's results through the Platform API."""
    priority: Priority = "normal"
    start_timeout_seconds: float | None = 600.0
    """Deadline for fal to *start* the request. Also stops ``fal_client`` from silently re-POSTing
    a submit after a read timeout (a duplicate billed request)."""
    upload_ttl_seconds: int | None = 24 * 3600
    """Lifetime of input files falflow uploads; payload deletion never removes inputs."""
    keep_failed_on_fal: bool = False
    """Keep a failed request's payloads (its input and fal's error) on fal, e.g. to debug it in
    fal's dashboard. Off: they are archived into the bucket (``error.json``) and deleted from fal
    like any request (a flagged prompt is exactly what should not stay there)."""
    private_outputs: bool | None = None
    """Create output files non-public (``initial_acl: forbid``): falflow reads them, and hands
    them to later steps, through short-lived signed URLs. None (the default): on when the fal key
    may sign URLs and set file ACLs (checked once per run), else off with a warning."""

    @field_validator("media_ttl_seconds", "upload_ttl_seconds", mode="before")
    @classmethod
    def _ttl_floor(cls, value: object) -> object:
        return _check_ttl(value)

    @field_validator("start_timeout_seconds")
    @classmethod
    def _start_timeout(cls, value: float | None) -> float | None:
        if value is not None and value <= 1:
            raise ValueError("must be more than 1 second (fal's minimum), or empty for no deadline")
        return value

    @model_validator(mode="after")
    def _store_io_needs_expiry(self) -> RetentionPolicy:
        _check_expiry(
            self.store_io,
            self.media_ttl_seconds,
            "FALFLOW_RETENTION__STORE_IO=false",
            "FALFLOW_RETENTION__MEDIA_TTL_SECONDS=never",
        )
        return self

    def lifecycle_header(self) -> str:
        """The ``X-Fal-Object-Lifecycle-Preference`` value (JSON)."""
        import json

        preference: dict[str, object] = {"expiration_duration_seconds": self.media_ttl_seconds}
        if self.private_outputs:
            preference["initial_acl"] = {"default": "forbid", "rules": []}
        return json.dumps(preference)

    def headers(self) -> dict[str, str]:
        """Request headers for a submit under this policy (start timeout goes via fal_client)."""
        return {
            "X-Fal-Object-Lifecycle-Preference": self.lifecycle_header(),
            "X-Fal-Store-IO": "1" if self.store_io else "0",
        }


class RetentionSettings(RetentionPolicy):
    """The default policy plus per-endpoint overrides matched by glob (first match wins)."""

    overrides: dict[str, RetentionOverride] = Field(default_factory=dict)
    allow_unverified: bool = False
    """Let a run end Completed although some request could not be archived (it is never deleted)."""

    @model_validator(mode="after")
    def _overrides_expire(self) -> RetentionSettings:
        base = self.policy_for("")
        for pattern, override in self.overrides.items():
            try:
                apply_override(base, override)
            except ValueError as exc:
                raise ValueError(f"override {pattern!r}: {exc}") from None
        return self

    def policy_for(self, endpoint: str) -> RetentionPolicy:
        base = RetentionPolicy(
            media_ttl_seconds=self.media_ttl_seconds,
            store_io=self.store_io,
            priority=self.priority,
            start_timeout_seconds=self.start_timeout_seconds,
            upload_ttl_seconds=self.upload_ttl_seconds,
            keep_failed_on_fal=self.keep_failed_on_fal,
            private_outputs=self.private_outputs,
        )
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(endpoint, pattern):
                return apply_override(base, override)
        return base


def apply_override(policy: RetentionPolicy, override: RetentionOverride) -> RetentionPolicy:
    """The policy with the override's set fields applied (used for endpoints and spec steps).

    Raises:
        ValueError: the result keeps outputs on fal forever (``store_io`` off, never expiring).
    """
    changes = override.model_dump(exclude_unset=True, exclude={"never_expire"})
    if override.never_expire:
        changes["media_ttl_seconds"] = None
    applied = policy.model_copy(update=changes)
    _check_expiry(
        applied.store_io, applied.media_ttl_seconds, "store_io: false", "a media TTL of never"
    )
    return applied


def _check_expiry(store_io: bool, ttl: int | None, store_io_name: str, ttl_name: str) -> None:
    """``store_io`` off leaves fal no stored output through which payload deletion finds the
    output files: only their media TTL removes them, so it cannot be 'never'."""
    if not store_io and ttl is None:
        raise ValueError(
            f"{store_io_name} together with {ttl_name} would keep every output file on fal "
            "forever (without stored outputs fal's payload deletion cannot find the files): "
            "set a media TTL, or keep store_io on"
        )


def _check_ttl(value: object) -> object:
    """Accept seconds, or ``never``/``null``/empty for never expire; refuse fal's unsafe range."""
    if isinstance(value, str):
        if value.strip().lower() in ("", "never", "null", "none"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"must be whole seconds or 'never' (got {value!r})") from None
    if isinstance(value, int) and not isinstance(value, bool) and value < MIN_MEDIA_TTL_SECONDS:
        raise ValueError(
            f"must be at least {MIN_MEDIA_TTL_SECONDS} seconds, or 'never' (got {value})"
        )
    return value


class FalSettings(_Model):
    """Where fal is. Real fal by default; the emulator sets these to 127.0.0.1."""

    queue_host: str = "queue.fal.run"
    run_host: str = "fal.run"
    rest_url: str = "https://rest.fal.ai"
    cdn_url: str = "https://v3.fal.media"
    platform_url: str = "https://api.fal.ai/v1"
    ca_bundle: Path | None = None
    """A PEM bundle to trust for every fal host (system CAs plus a private CA, e.g. the emulator's)."""
    cdn_hosts: tuple[str, ...] = ("fal.media", "*.fal.media")
    """Hosts outputs may be downloaded from (glob). Anything else in an output is refused."""
    credentials_block: str | None = None
    """Name of a ``FalCredentials`` block (``settings/blocks.py``) whose keys replace ``FAL_KEY``
    and ``FAL_ADMIN_KEY`` in flow runs."""

    @field_validator("rest_url", "cdn_url", "platform_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if urlsplit(value).scheme != "https":
            raise ValueError(f"must be an https:// URL (got {value!r})")
        return value.rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _bundle_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


class BucketSettings(_Model):
    """The user's own bucket: where outputs, inputs and the ledger go."""

    url: str = "file://./falflow-archive"
    """``file://`` (relative or absolute path), ``s3://bucket/prefix``, ``gs://``, ``az://container``, ``memory://``."""
    block: str | None = None
    """A prefect-aws block to take the bucket from in flow runs, ``<block type slug>/<name>``:
    ``s3-bucket/archive`` (URL and credentials) or ``aws-credentials/prod`` (credentials for
    ``url``); see ``settings/blocks.py``."""
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    region: str | None = None
    endpoint: str | None = None
    """S3-compatible endpoint (e.g. a moto server or MinIO), Azure's blob endpoint, or GCS's base
    URL (e.g. an emulator); plain http needs ``allow_http``."""
    allow_http: bool = False
    azure_account_name: str | None = None
    azure_account_key: SecretStr | None = None
    gcs_service_account_key: SecretStr | None = None
    """Service-account JSON for ``gs://`` (else the environment's default credentials)."""
    store_checksums: bool = True
    """S3: send a SHA-256 checksum with every upload (and each part of a multipart one), so the
    store itself refuses bytes damaged on the way. Off for S3-compatible stores without S3's
    additional checksums; falflow's own sha256 verifies the archive either way."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in BUCKET_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in BUCKET_SCHEMES)
            raise ValueError(f"unknown bucket scheme {scheme!r}: use one of {allowed}")
        if scheme in ("s3", "gs", "az") and not urlsplit(value).netloc:
            raise ValueError(f"{scheme}:// needs a bucket name, e.g. {scheme}://my-bucket/falflow")
        return value


class LimitSettings(_Model):
    """Concurrency and rate limits: per flow run, and optionally account-wide through Prefect's
    global concurrency limits."""

    max_in_flight: Annotated[int, Field(ge=1, le=10_000)] = 256
    """Requests submitted and not yet finished at once."""
    downloads: Annotated[int, Field(ge=1, le=256)] = 16
    archive_buffer_bytes: Annotated[int, Field(ge=1024**2)] = 40 * 1024**2
    """Output bytes held in memory at once by all downloads together (each upload buffers up to
    a few parts): bounds peak memory whatever the file sizes; a larger file still streams."""
    deletes: Annotated[int, Field(ge=1, le=256)] = 8
    delete_rate_per_second: Annotated[float, Field(gt=0)] = 50.0
    """Platform API calls a second (deletions, listings, ACL changes). fal publishes no limit: the
    pace starts here, slows at every 429 and creeps back while calls succeed."""
    poll_interval_seconds: Annotated[float, Field(ge=0.05, le=60)] = 0.5
    """First status poll interval; it backs off to ``max_poll_interval_seconds``."""
    max_poll_interval_seconds: Annotated[float, Field(ge=0.05, le=300)] = 5.0
    max_file_bytes: Annotated[int, Field(ge=1)] = 20 * 1024**3
    """Largest output file falflow will archive; a larger one is refused (and not deleted)."""
    lease_seconds: Annotated[float, Field(ge=10, le=3600)] = 120.0
    """How long a run's lease (its proof of life in the bucket) stays valid unless renewed; it is
    renewed every quarter of that. The janitor finishes a killed run's records this long after
    the kill (plus its grace period)."""
    jobs_per_task_run: Annotated[int, Field(ge=1, le=10_000)] = 50
    """Requests handled by one Prefect task run (the OSS server drops runs past ~5,000 queued events)."""
    account_concurrency_limit: str | None = None
    """Name of a Prefect global concurrency limit (``prefect gcl create fal-prod --limit 50``)
    of which each request holds one slot while in flight, on top of ``max_in_flight``: shared
    by every flow run on the server, so many runs on one fal account stay under one bound.
    Costs two Prefect API calls per request. Empty: per-run limits only."""
    delete_rate_limit: str | None = None
    """Name of a Prefect global concurrency limit with slot decay (``prefect gcl create
    fal-deletes --limit 10 --slot-decay-per-second 10``) every Platform API deletion takes a
    slot of, on top of ``delete_rate_per_second``: one deletion rate for all runs together."""


class WebhookSettings(_Model):
    """The fal webhook receiver (``falflow webhooks serve``): verifies fal's signatures, emits events."""

    jwks_url: str | None = None
    """Where fal publishes its signing keys; empty means ``{fal.rest_url}/.well-known/jwks.json``
    (``https://rest.fal.ai/.well-known/jwks.json`` on real fal). Trusts ``fal.ca_bundle``."""
    tolerance_seconds: Annotated[int, Field(ge=1, le=3600)] = 300
    """Largest accepted |now - X-Fal-Webhook-Timestamp|: older (or future) deliveries are refused."""
    jwks_cache_seconds: Annotated[int, Field(ge=60, le=24 * 3600)] = 24 * 3600
    """How long fetched keys are trusted before they are fetched again (at most a day)."""
    jwks_refetch_seconds: Annotated[float, Field(ge=1, le=3600)] = 60.0
    """Least time between two fetches caused by a signature no cached key verifies."""
    allowed_user_ids: tuple[str, ...] = ()
    """fal user ids whose deliveries are accepted; empty accepts any. fal signs a webhook for
    whoever submitted the request, so anyone with a fal account can reach an open receiver."""
    dedupe_seconds: Annotated[int, Field(ge=60)] = 48 * 3600
    """How long a delivered request id is remembered (fal retries deliveries for hours)."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024**2
    header_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    """A request's line and headers must arrive within this; slower connections are closed."""
    body_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """A delivery's body must arrive within this (answered 408 otherwise; fal delivers again)."""
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    """Connections and deliveries handled at once; above it new requests are answered 503."""
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8780
    path: str = "/fal/webhook"

    @field_validator("jwks_url")
    @classmethod
    def _jwks_https(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme != "https":
            raise ValueError(
                f"must be an https:// URL, keys over plain http can be forged (got {value!r})"
            )
        return value

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value


class Settings(BaseSettings):
    """All of falflow's configuration. Build it with :func:`settings.load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="FALFLOW_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    fal_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FAL_KEY", "fal_key")
    )
    fal_admin_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FAL_ADMIN_KEY", "fal_admin_key")
    )
    """Key for the Platform API's delete operations (needs admin scope); defaults to ``FAL_KEY``."""
    fal: FalSettings = Field(default_factory=FalSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    bucket: BucketSettings = Field(default_factory=BucketSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    @field_validator("fal_key", "fal_admin_key", mode="before")
    @classmethod
    def _usable_key(cls, value: object) -> object:
        """An empty or blank key is no key; one an HTTP header cannot carry is an error (the
        message never shows the value)."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            return value
        text = text.strip()
        if not text:
            return None
        if any(not " " <= char <= "~" for char in text):
            raise ValueError(
                "is not a usable fal key: it holds characters an HTTP header cannot carry "
                "(a pasted newline, quote or non-ASCII character?)"
            )
        return text

    @model_validator(mode="after")
    def _poll_bounds(self) -> Settings:
        if self.limits.max_poll_interval_seconds < self.limits.poll_interval_seconds:
            raise ValueError(
                "limits.max_poll_interval_seconds must be >= limits.poll_interval_seconds"
            )
        return self

    @property
    def delete_key(self) -> SecretStr | None:
        return self.fal_admin_key or self.fal_key
