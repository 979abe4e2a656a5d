"""Archiving a completed request into the bucket, verified, as soon as it completes.

Per request, under ``runs/{run_key}/{job_id}/``: ``input.json`` (what was submitted),
``output.json`` (fal's output as returned), ``files/NNN-name`` (every allowed fal CDN file, streamed
with its sha256 computed on the way), and ``archived.json`` (the output with those URLs rewritten
to their bucket locations). Only when all of it is in place is the record ``archived``, the one
state cleanup deletes from. Anything refused or failed is written to the record's ``error``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any
from urllib.parse import urljoin

import anyio
import httpx
from obstore.exceptions import BaseError as ObjectStoreError

from falflow.tasks.errors import join_bounded
from falflow.tasks.http import RETRY_STATUSES, backoff_seconds, retry_after_seconds
from falflow.tasks.ledger import run_prefix
from falflow.tasks.models import JSON, ArchivedObject, Job, JobRecord, JobState, utcnow
from falflow.tasks.outputs import (
    OutputFile,
    OutputRefused,
    check_file_name,
    check_source,
    describe_url,
    find_files,
    object_key,
    rewrite_urls,
)
from falflow.tasks.platform import PlatformError
from falflow.tasks.runtime import Runtime, run_logger
from falflow.tasks.signing import signed_url
from falflow.tasks.store import UPLOAD_BUFFER_BYTES

DOWNLOAD_ATTEMPTS = 4
"""Truncated downloads and resets are retried from the start this many times in all."""
MAX_REDIRECTS = 5
LEDGER_BATCH_FILES = 50
"""Archived files recorded in the ledger together while an output's files are archived."""
READ_CHUNK_BYTES = 1024 * 1024


class ArchiveError(Exception):
    """A file could not be archived; the message says which and why."""


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


async def save_input(rt: Runtime, job: Job, record: JobRecord) -> JobRecord:
    """Write ``input.json`` (the arguments about to be submitted); the record returned names it
    and is written to the ledger by the submit that follows."""
    key = f"{run_prefix(record.run_key, record.job_id)}/input.json"
    await rt.bucket.put_bytes(key, _json_bytes(job.arguments))
    return record.model_copy(update={"input_key": key})


async def save_output(rt: Runtime, record: JobRecord, output: JSON) -> JobRecord:
    """Write fal's output as ``output.json`` and mark the record ``completed``.

    Done before any file is fetched, so a re-run can archive without asking fal again.
    """
    key = f"{run_prefix(record.run_key, record.job_id)}/output.json"
    await rt.bucket.put_bytes(key, _json_bytes(output))
    return await rt.ledger.put(
        record.moved_to(
            JobState.COMPLETED, output_key=key, finished_at=utcnow(), error=None, error_type=None
        )
    )


async def save_error(rt: Runtime, record: JobRecord, error: JSON) -> JobRecord:
    """Write ``error.json`` (fal's error answer, status and logs of a failed request); with
    ``input.json`` that is the whole archive of a failed request, after which it may be deleted
    from fal. The record returned names it and is written to the ledger by the caller."""
    key = f"{run_prefix(record.run_key, record.job_id)}/error.json"
    await rt.bucket.put_bytes(key, _json_bytes(error))
    return record.model_copy(update={"error_key": key})


async def load_output(rt: Runtime, record: JobRecord) -> JSON:
    """fal's output of a completed record, from its ``output.json``."""
    data = None if record.output_key is None else await rt.bucket.get_bytes(record.output_key)
    if data is None:
        raise ArchiveError(
            f"job {record.job_id} is {record.state.value} but its output.json is missing from "
            f"the bucket ({record.output_key}); was the bucket changed by hand?"
        )
    output: JSON = json.loads(data)
    return output


async def archive(rt: Runtime, record: JobRecord, output: JSON) -> JobRecord:
    """Archive every file of ``output`` and write ``archived.json``; ``archived`` if all verified.

    Files already archived by an earlier attempt (same URL and key in the record, same size in
    the bucket) are not fetched again. Returns the record, ``completed`` with ``error`` set when
    anything was refused or failed: such a request is never deleted from fal.
    """
    prefix = run_prefix(record.run_key, record.job_id)
    cdn_hosts = rt.settings.fal.cdn_hosts
    refused: list[str] = []
    failed: list[str] = []
    planned: list[tuple[OutputFile, str]] = []
    for index, file in enumerate(find_files(output)):
        try:
            check_source(file.url, cdn_hosts)
            check_file_name(file.file_name)
        except OutputRefused as exc:
            refused.append(str(exc))
            continue
        planned.append((file, object_key(prefix, index, file)))

    objects = {o.source_url: o for o in record.objects}
    position = {file.url: index for index, (file, _) in enumerate(planned)}
    unrecorded = 0

    def in_output_order() -> list[ArchivedObject]:
        """The archived files in the output's order, whatever order their downloads finished
        in (a record reads the same however often it is written)."""
        return sorted(objects.values(), key=lambda o: position.get(o.source_url, len(position)))

    lock = anyio.Lock()

    async def archive_one(file: OutputFile, key: str) -> None:
        nonlocal record, unrecorded
        earlier = objects.get(file.url)
        if earlier is not None and earlier.key == key and await rt.bucket.size(key) == earlier.size:
            return
        try:
            archived = await archive_file(
                rt, file, key, private=bool(record.policy.private_outputs)
            )
        except OutputRefused as exc:
            refused.append(str(exc))
            return
        except ArchiveError as exc:
            failed.append(str(exc))
            return
        objects[file.url] = archived
        unrecorded += 1
        # The record is rewritten whole: per batch of files, not per file (quadratic in an
        # output of thousands), so a crash re-fetches at most one batch.
        if unrecorded >= LEDGER_BATCH_FILES and not lock.locked():
            async with lock:
                unrecorded = 0
                record = await rt.ledger.put(
                    record.model_copy(update={"objects": in_output_order()})
                )

    async with anyio.create_task_group() as tg:
        for file, key in planned:
            tg.start_soon(archive_one, file, key)
    record = record.model_copy(update={"objects": in_output_order()})

    log = run_logger()
    if refused or failed:
        record = record.model_copy(
            update={
                "error_type": "archive_refused" if refused else "archive_failed",
                "error": rt.redact(join_bounded([*refused, *failed])),
            }
        )
        log.warning("%s: archive not verified, kept on fal: %s", record.job_id, record.error)
        return await rt.ledger.put(record)

    locations = {o.source_url: rt.bucket.location(o.key) for o in record.objects}
    archived_key = f"{prefix}/archived.json"
    await rt.bucket.put_bytes(archived_key, _json_bytes(rewrite_urls(output, locations)))
    record = await rt.ledger.put(
        record.moved_to(
            JobState.ARCHIVED,
            archived_output_key=archived_key,
            archived_at=utcnow(),
            error=None,
            error_type=None,
        )
    )
    log.debug(  # per request at debug: a 10,000-request run logs a summary per batch instead
        "%s: archived request %s: %d files, %d bytes",
        record.job_id,
        record.request_id,
        len(record.objects),
        record.archived_bytes,
    )
    return record


async def archive_file(
    rt: Runtime, file: OutputFile, key: str, *, private: bool = False
) -> ArchivedObject:
    """Stream ``file`` into ``key``, hashing it; verify its size; retry truncations and resets.

    A ``private`` file (and one fal answers 403 for: the account's default may be non-public)
    is read through a signed URL.

    Raises:
        OutputRefused: larger than ``limits.max_file_bytes``, or redirected off the CDN hosts.
        ArchiveError: the file is gone, or kept failing after ``DOWNLOAD_ATTEMPTS``.
    """
    max_bytes = rt.settings.limits.max_file_bytes
    if file.file_size is not None and file.file_size > max_bytes:
        raise _too_large(file.url, file.file_size, max_bytes)
    reason = ""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            # Memory is reserved before the GET when the output states the file's size, else
            # once the answer's Content-Length is known (in _store).
            stated = file.file_size is not None
            async with rt.downloads, _buffering(rt, file.file_size) if stated else nullcontext():
                return await _copy(rt, file, key, max_bytes, private)
        except _Forbidden:
            if private:
                raise ArchiveError(
                    f"{describe_url(file.url)} answered 403 even through a signed URL: check that "
                    "FAL_KEY may sign URLs (falflow doctor)"
                ) from None
            private = True  # not public: read it signed
            reason = "HTTP 403"
        except PlatformError as exc:
            raise ArchiveError(
                f"could not sign {describe_url(file.url)} to read it ({exc}); kept on fal"
            ) from None
        except (_Retry, httpx.TransportError, ObjectStoreError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Retry) else str(exc)
            delay = exc.delay if isinstance(exc, _Retry) else None
            if attempt < DOWNLOAD_ATTEMPTS:
                await anyio.sleep(backoff_seconds(attempt) if delay is None else delay)
    raise ArchiveError(
        f"could not archive {describe_url(file.url)} after {DOWNLOAD_ATTEMPTS} attempts "
        f"({reason}); kept on fal, re-run with the same run key to try again"
    )


async def _copy(
    rt: Runtime, file: OutputFile, key: str, max_bytes: int, private: bool
) -> ArchivedObject:
    url = await signed_url(rt, file.url) if private else file.url
    for _ in range(MAX_REDIRECTS + 1):
        request = rt.http.build_request("GET", url, headers={"Accept-Encoding": "identity"})
        response = await rt.http.send(request, stream=True)
        try:
            if response.is_redirect:
                url = urljoin(url, response.headers.get("location", ""))
                check_source(url, rt.settings.fal.cdn_hosts)
                continue
            return await _store(rt, file, key, max_bytes, response)
        finally:
            await response.aclose()
    raise ArchiveError(f"{describe_url(file.url)} redirected more than {MAX_REDIRECTS} times")


async def _store(
    rt: Runtime, file: OutputFile, key: str, max_bytes: int, response: httpx.Response
) -> ArchivedObject:
    status = response.status_code
    if status in RETRY_STATUSES:
        raise _Retry(f"HTTP {status}", retry_after_seconds(response))
    if status == 403:
        raise _Forbidden
    if status != 200:
        raise ArchiveError(
            f"{describe_url(file.url)} answered HTTP {status}: the file is gone from fal's CDN "
            "(expired, deleted or hidden) and cannot be archived"
        )
    length = _content_length(response)
    if length is not None and length > max_bytes:
        raise _too_large(file.url, length, max_bytes)
    digest = hashlib.sha256()
    size = 0
    reserved = file.file_size is not None
    failure: Exception | None = None
    async with (
        nullcontext() if reserved else _buffering(rt, length),
        anyio.create_task_group() as hashing,
    ):
        hashed = anyio.Event()
        hashed.set()

        async def chunks() -> AsyncIterator[bytes]:
            # Each chunk is hashed in a worker thread while the next one is read (hashlib
            # releases the GIL), keeping the event loop free; updates stay in order.
            nonlocal size, hashed
            async for chunk in response.aiter_raw(READ_CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(file.url, size, max_bytes)
                await hashed.wait()
                hashed = anyio.Event()
                hashing.start_soon(_hash, digest, chunk, hashed)
                yield chunk

        try:
            etag = await rt.bucket.put_stream(key, chunks())
        except Exception as exc:  # raised as itself, not wrapped in the task group's group
            failure = exc
    if failure is not None:
        raise failure
    if length is not None and size != length:
        raise _Retry(f"truncated download: {size} of {length} bytes")
    if file.file_size is not None and size != file.file_size:
        raise ArchiveError(
            f"{describe_url(file.url)} served {size} bytes but fal's output states file_size "
            f"{file.file_size}: not verified, kept on fal"
        )
    stored = await rt.bucket.size(key)
    if stored != size:
        raise _Retry(f"the bucket holds {stored} bytes of {key}, {size} were downloaded")
    return ArchivedObject(
        source_url=file.url,
        key=key,
        size=size,
        sha256=digest.hexdigest(),
        content_type=response.headers.get("content-type") or file.content_type,
        store_etag=etag,
    )


class _Forbidden(Exception):
    """fal's CDN answered 403: the file is not public."""


def _buffering(rt: Runtime, size: int | None) -> AbstractAsyncContextManager[int]:
    """Hold the memory a download of ``size`` bytes (None: unknown) may buffer on its way to the
    bucket, out of ``limits.archive_buffer_bytes``."""
    return rt.buffers.reserve(
        UPLOAD_BUFFER_BYTES if size is None else min(size, UPLOAD_BUFFER_BYTES)
    )


async def _hash(digest: hashlib._Hash, chunk: bytes, done: anyio.Event) -> None:
    await anyio.to_thread.run_sync(digest.update, chunk)
    done.set()


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _too_large(url: str, size: int, max_bytes: int) -> OutputRefused:
    return OutputRefused(
        f"output file {describe_url(url)} is {size} bytes, above the {max_bytes}-byte cap "
        "(FALFLOW_LIMITS__MAX_FILE_BYTES); not archived, kept on fal"
    )


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False).encode()
