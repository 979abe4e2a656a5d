"""One runtime per flow run: settings, clients, bucket, ledger and limiters, shared by every task.

Prefect tasks take only serialisable parameters (jobs, ids); they find the runtime through
:func:`current_runtime`, which :func:`open_runtime` sets for everything awaited inside it.

Example:
    ```python
    async with open_runtime(load_settings(), "nightly-2025-01-31") as rt:
        outcome = await run_job(rt, job)
    ```
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import fal_client
import httpx
from obstore.store import ObjectStore
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.logging.loggers import LoggingAdapter
from pydantic import SecretStr

from falflow.settings import Settings, SettingsError
from falflow.tasks.budget import ByteBudget
from falflow.tasks.falhosts import configure_fal_client
from falflow.tasks.http import ShardedTransport
from falflow.tasks.ledger import Ledger, check_segment
from falflow.tasks.models import ArchivedObject
from falflow.tasks.platform import PlatformClient
from falflow.tasks.store import Bucket, open_bucket, settle

_CURRENT: ContextVar[Runtime] = ContextVar("falflow_runtime")
_SPARE_CONNECTIONS = 16
_REDACTED = "***"


@dataclass
class Runtime:
    settings: Settings
    run_key: str
    fal: fal_client.AsyncClient
    """For submits and uploads (its own HTTP client, auth and retries)."""
    http: httpx.AsyncClient
    """The shared client for everything else: status, results, CDN downloads, Platform API."""
    bucket: Bucket
    ledger: Ledger
    platform: PlatformClient
    in_flight: anyio.CapacityLimiter
    """Requests submitted and not yet finished (``limits.max_in_flight``)."""
    downloads: anyio.CapacityLimiter
    buffers: ByteBudget
    """Output bytes held in memory by downloads (``limits.archive_buffer_bytes``)."""
    uploads: list[str] = field(default_factory=list)
    """Input files uploaded to fal in this run: hidden when the run's scope ends (payload
    deletion never removes inputs)."""
    gone: dict[str, ArchivedObject] | None = None
    """This run's archived outputs whose fal copy is gone, by fal URL (read once, when needed)."""
    signed: dict[str, tuple[str, float]] = field(default_factory=dict)
    """fal URL → a signed URL of it and when that expires (monotonic clock), for reuse."""
    _secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def store(self) -> ObjectStore:
        """The obstore store behind the bucket."""
        return self.bucket.store

    def fal_headers(self) -> dict[str, str]:
        """Auth for fal's queue (status, result, cancel). Never log or record these."""
        key = self.settings.fal_key
        assert key is not None  # open_runtime refuses to start without one
        return {"Authorization": f"Key {key.get_secret_value()}"}

    def account_slot(self) -> AbstractAsyncContextManager[None]:
        """A slot of the account-wide Prefect global concurrency limit
        (``limits.account_concurrency_limit``), held while a request is in flight; nothing
        without one. Strict: a limit that does not exist fails the request rather than silently
        limiting nothing."""
        name = self.settings.limits.account_concurrency_limit
        if name is None:
            return nullcontext()
        # a video may take longer than a lease: a lost renewal must not kill the request
        return concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False)

    def redact(self, text: str) -> str:
        """``text`` with every configured secret replaced: for errors kept in the ledger or raised."""
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text


def current_runtime() -> Runtime:
    """The runtime of the enclosing :func:`open_runtime`."""
    try:
        return _CURRENT.get()
    except LookupError:
        raise RuntimeError(
            "no falflow runtime here: call this inside a retention scope "
            "(`async with falflow.retention_scope():`) or `open_runtime(settings, run_key)`"
        ) from None


def new_run_key() -> str:
    """A fresh, sortable run key, e.g. ``20250131-120501-3f2a9c1d``."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def run_logger() -> logging.Logger | LoggingAdapter:
    """The Prefect run logger inside a flow or task run, else the ``falflow`` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("falflow")


@asynccontextmanager
async def open_runtime(settings: Settings, run_key: str) -> AsyncIterator[Runtime]:
    """Build the run's clients and make them :func:`current_runtime` until the block exits.

    Raises:
        SettingsError: no fal key is configured.
        ValueError: ``run_key`` cannot be used in bucket keys.
    """
    check_segment(run_key, "run key")
    key = require_fal_key(settings)
    if settings.bucket.url.startswith("memory://"):
        raise SettingsError(
            "FALFLOW_BUCKET__URL: a memory:// bucket dies with the process, and a run deletes "
            "fal's copy once archived: nothing would be left. Use file://, s3://, gs:// or az://"
        )
    configure_fal_client(settings.fal)
    limits = settings.limits
    connections = limits.max_in_flight + limits.downloads + limits.deletes + _SPARE_CONNECTIONS
    http = http_client(settings, connections)
    fal = fal_client.AsyncClient(key=key.get_secret_value())
    try:
        bucket = open_bucket(settings.bucket)
    except OSError as exc:  # a file:// directory that cannot be created
        raise SettingsError(
            f"FALFLOW_BUCKET__URL: cannot create the bucket directory {exc.filename}: "
            f"{exc.strerror}; nothing was submitted"
        ) from None
    rt = Runtime(
        settings=settings,
        run_key=run_key,
        fal=fal,
        http=http,
        bucket=bucket,
        ledger=Ledger(bucket),
        platform=platform_client(settings, http),
        in_flight=anyio.CapacityLimiter(limits.max_in_flight),
        downloads=anyio.CapacityLimiter(limits.downloads),
        buffers=ByteBudget(limits.archive_buffer_bytes),
        _secrets=_secret_values(settings),
    )
    token = _CURRENT.set(rt)
    try:
        yield rt
    finally:
        _CURRENT.reset(token)
        with anyio.CancelScope(shield=True):
            await http.aclose()
            if "_client" in vars(fal):  # fal_client never closes the client it made lazily
                await (await fal._client).aclose()
            await settle()


def require_fal_key(settings: Settings) -> SecretStr:
    """The fal key.

    Raises:
        SettingsError: no fal key is configured.
    """
    if settings.fal_key is None:
        raise SettingsError(
            "FAL_KEY is not set: set it to your fal API key (FAL_ADMIN_KEY too if that key "
            "cannot delete payloads)"
        )
    return settings.fal_key


def http_client(settings: Settings, connections: int) -> httpx.AsyncClient:
    """falflow's HTTP client for fal: trusts ``fal.ca_bundle``, never follows redirects."""
    verify: ssl.SSLContext | bool = True
    if settings.fal.ca_bundle is not None:
        verify = ssl.create_default_context(cafile=str(settings.fal.ca_bundle))
    return httpx.AsyncClient(
        transport=ShardedTransport(max_connections=connections, verify=verify),
        timeout=httpx.Timeout(30.0, read=60.0),
        follow_redirects=False,  # a redirect must pass the same host check as the URL itself
    )


def platform_client(settings: Settings, http: httpx.AsyncClient) -> PlatformClient:
    """The Platform API client of ``settings``, paced and bounded by its limits."""
    return PlatformClient(
        http,
        settings.fal.platform_url,
        api_key=settings.fal_key,
        admin_key=settings.delete_key,
        rate_per_second=settings.limits.delete_rate_per_second,
        concurrency=settings.limits.deletes,
        shared_rate_limit=settings.limits.delete_rate_limit,
    )


def _secret_values(settings: Settings) -> tuple[str, ...]:
    bucket = settings.bucket
    candidates = (
        settings.fal_key,
        settings.fal_admin_key,
        bucket.access_key_id,
        bucket.secret_access_key,
        bucket.session_token,
        bucket.azure_account_key,
        bucket.gcs_service_account_key,
    )
    return tuple(
        value
        for secret in candidates
        if secret is not None and len(value := secret.get_secret_value()) >= 4
    )
