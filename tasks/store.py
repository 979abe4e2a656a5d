"""The user's bucket through obstore: one constructor for every bucket kind, a few typed helpers.

``file://`` paths may be relative (resolved against the working directory and created);
``memory://NAME`` stores live as long as the process, so re-opening the same URL finds the same
objects (what a resumed run expects of a bucket). S3 uploads carry a SHA-256 checksum the store
checks (``bucket.store_checksums``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError as ObjectStoreError
from obstore.exceptions import NotFoundError
from obstore.store import AzureStore, GCSStore, LocalStore, MemoryStore, ObjectStore, S3Store

from falflow.settings import BucketSettings, SettingsError

if TYPE_CHECKING:
    from obstore.store import AzureConfig, ClientConfig, GCSConfig, S3Config

STREAM_CHUNK_BYTES = 5 * 1024 * 1024
"""Multipart part size for streamed objects; with STREAM_CONCURRENCY bounds memory per upload."""
STREAM_CONCURRENCY = 2
UPLOAD_BUFFER_BYTES = STREAM_CHUNK_BYTES * (STREAM_CONCURRENCY + 1)
"""The most a streamed upload holds in memory: its parts in flight and the one being filled."""

CHECKSUM_PROBE_KEY = ".falflow/checksum-probe"
"""Written only after an upload failed, to tell whether the store refuses checksums; deleted
after, where the store lets obstore delete (its deletes carry a SHA-256 checksum too)."""

_MEMORY_STORES: dict[str, MemoryStore] = {}

NOT_FOUND = (FileNotFoundError, NotFoundError)
"""What obstore raises for a missing object (``LocalStore``: FileNotFoundError)."""


@dataclass(frozen=True)
class Bucket:
    """An obstore store plus the URL its keys are relative to."""

    store: ObjectStore
    url: str
    """The bucket's base URL, normalised (``file://`` made absolute)."""
    unchecked: ObjectStore | None = None
    """The same S3 store without upload checksums, used only after an upload failed: to tell a
    store that refuses checksums from one that fails for another reason."""

    def location(self, key: str) -> str:
        """Where ``key`` lives, as a URL a person (or another tool) can use."""
        return f"{self.url.rstrip('/')}/{key}"

    async def signed_get(self, key: str, seconds: int) -> str | None:
        """A presigned URL that reads ``key`` for ``seconds``, or None where the store cannot
        sign (a local directory, memory)."""
        if not isinstance(self.store, S3Store | GCSStore | AzureStore):
            return None
        return await obstore.sign_async(self.store, "GET", key, timedelta(seconds=seconds))

    async def put_bytes(self, key: str, data: bytes) -> str | None:
        """Write ``data`` to ``key`` in one request; the store's ETag for it, if it gave one."""
        return await self._put(key, data)

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> str | None:
        """Stream ``chunks`` into ``key`` with bounded memory; the store's ETag for it, if any.

        An object that fits in one part goes up in a single request (a multipart upload takes
        three); a larger one as a multipart upload.
        """
        iterator = aiter(chunks)
        head: list[bytes] = []
        held = 0
        async for chunk in iterator:
            head.append(chunk)
            held += len(chunk)
            if held > STREAM_CHUNK_BYTES:
                break
        else:
            return await self._put(key, head)  # the chunks as they are: no joined copy

        async def rest() -> AsyncIterator[bytes]:
            while head:
                yield head.pop(0)
            async for chunk in iterator:
                yield chunk

        return await self._put(key, rest())

    async def _put(self, key: str, data: bytes | list[bytes] | AsyncIterator[bytes]) -> str | None:
        streamed = not isinstance(data, bytes | list)
        try:
            result = await obstore.put_async(
                self.store,
                key,
                data,
                use_multipart=streamed,
                chunk_size=STREAM_CHUNK_BYTES,
                max_concurrency=STREAM_CONCURRENCY,
            )
        except ObjectStoreError as exc:
            await self._explain(exc, streamed=streamed)
            raise
        return result["e_tag"]

    async def _explain(self, failure: ObjectStoreError, *, streamed: bool) -> None:
        """Raise a SettingsError naming ``store_checksums`` if ``failure`` is the store refusing
        upload checksums: the same kind of upload fails with one and succeeds without."""
        if self.unchecked is None:
            return

        async def probe(store: ObjectStore) -> bool:
            async def one_chunk() -> AsyncIterator[bytes]:
                yield b"falflow checksum probe"

            try:
                data = one_chunk() if streamed else b"falflow checksum probe"
                await obstore.put_async(store, CHECKSUM_PROBE_KEY, data)
            except ObjectStoreError:
                return False
            return True

        refused = not await probe(self.store) and await probe(self.unchecked)
        with contextlib.suppress(ObjectStoreError):
            await obstore.delete_async(self.unchecked, CHECKSUM_PROBE_KEY)
        if not refused:
            return
        raise SettingsError(
            f"FALFLOW_BUCKET__STORE_CHECKSUMS: the store behind {self.url} refuses uploads "
            "carrying an S3 SHA-256 checksum and takes them without one (it does not support "
            "S3's additional checksums). Set FALFLOW_BUCKET__STORE_CHECKSUMS=false; falflow's "
            f"own sha256 still verifies every archived file. The store answered: {failure}"
        ) from failure

    async def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None if there is no such object."""
        try:
            result = await obstore.get_async(self.store, key)
        except NOT_FOUND:
            return None
        return bytes(await result.bytes_async())

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, or None if there is no such object."""
        try:
            meta = await obstore.head_async(self.store, key)
        except NOT_FOUND:
            return None
        return meta["size"]

    async def keys(self, prefix: str) -> AsyncIterator[str]:
        """Every key under ``prefix`` (a path-segment prefix, e.g. ``ledger/run-1``)."""
        async for chunk in obstore.list(self.store, prefix):
            for meta in chunk:
                yield meta["path"]


def open_bucket(bucket: BucketSettings) -> Bucket:
    """Build the store for ``bucket.url``. Credentials not given fall back to the environment."""
    parts = urlsplit(bucket.url)
    prefix = parts.path.strip("/") or None
    if parts.scheme == "file":
        directory = _local_directory(bucket.url)
        directory.mkdir(parents=True, exist_ok=True)
        return Bucket(LocalStore(directory, mkdir=True), directory.as_uri())
    if parts.scheme == "memory":
        return Bucket(_MEMORY_STORES.setdefault(bucket.url, MemoryStore()), bucket.url)
    if parts.scheme == "s3":
        s3: S3Config = {}
        if bucket.access_key_id is not None:
            s3["access_key_id"] = bucket.access_key_id.get_secret_value()
        if bucket.secret_access_key is not None:
            s3["secret_access_key"] = bucket.secret_access_key.get_secret_value()
        if bucket.session_token is not None:
            s3["session_token"] = bucket.session_token.get_secret_value()
        if bucket.region is not None:
            s3["region"] = bucket.region
        if bucket.endpoint is not None:
            s3["endpoint"] = bucket.endpoint
        client: ClientConfig = {"allow_http": bucket.allow_http}
        unchecked = S3Store(parts.netloc, prefix=prefix, config=s3, client_options=client)
        if not bucket.store_checksums:
            return Bucket(unchecked, bucket.url)
        checked = S3Store(
            parts.netloc,
            prefix=prefix,
            config={**s3, "checksum_algorithm": "SHA256"},
            client_options=client,
        )
        return Bucket(checked, bucket.url, unchecked=unchecked)
    if parts.scheme == "gs":
        gcs: GCSConfig = {}
        if bucket.gcs_service_account_key is not None:
            gcs["service_account_key"] = bucket.gcs_service_account_key.get_secret_value()
        if bucket.endpoint is not None:
            gcs["base_url"] = bucket.endpoint
        gcs_store = GCSStore(
            parts.netloc,
            prefix=prefix,
            config=gcs,
            client_options={"allow_http": bucket.allow_http},
        )
        return Bucket(gcs_store, bucket.url)
    if parts.scheme == "az":
        azure: AzureConfig = {}
        if bucket.azure_account_name is not None:
            azure["account_name"] = bucket.azure_account_name
        if bucket.azure_account_key is not None:
            azure["account_key"] = bucket.azure_account_key.get_secret_value()
        if bucket.endpoint is not None:
            azure["endpoint"] = bucket.endpoint
        az_store = AzureStore(
            parts.netloc,
            prefix=prefix,
            config=azure,
            client_options={"allow_http": bucket.allow_http},
        )
        return Bucket(az_store, bucket.url)
    raise ValueError(f"unsupported bucket URL {bucket.url!r}")  # BucketSettings validates schemes


async def settle() -> None:
    """Let obstore's background work finish before the event loop closes.

    CPython 3.11 aborted (SIGABRT) in a fifth to half of the processes whose last action was a
    streamed ``put_async``; a short sleep afterwards avoided it (docs/platform-notes.md).
    """
    await asyncio.sleep(0.05)


def _local_directory(url: str) -> Path:
    rest = url[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    path = Path(rest).expanduser()
    return path if path.is_absolute() else (Path.cwd() / path).resolve()
