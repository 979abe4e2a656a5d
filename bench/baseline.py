"""The hand-written programs falflow is measured against: ``fal_client`` + asyncio + httpx + obstore.

Nothing here imports falflow. They do what a careful person would write by hand for the same
retention policy: submit with the retention headers, wait with a sane poll interval, stream each
output into the bucket while hashing it, keep the request's JSON (deletion removes it from fal),
then delete the payloads through the Platform API. Hosts, key and CA come from the environment
(``FAL_QUEUE_RUN_HOST``, ``FAL_KEY``, ``SSL_CERT_FILE``), as a hand-written program would take them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import fal_client
import httpx
import obstore
from obstore.store import AzureStore, ObjectStore, S3Store, from_url

from bench.harness import JSON, stopwatch
from bench.servers import AZURITE_ACCOUNT, AZURITE_KEY, S3_KEY_ID, S3_REGION, S3_SECRET

TEXT_TO_IMAGE = "fal-ai/flux/schnell"
IMAGE_TO_IMAGE = "fal-ai/esrgan"
COPY_CHUNK_BYTES = 1024 * 1024
"""Chunks handed to obstore: httpx's own ~64 KiB reads cost twice the CPU per byte."""


def open_store(url: str, endpoint: str | None = None) -> ObjectStore:
    """The bucket at ``url``; an ``s3://`` or ``az://`` one lives on the local server at
    ``endpoint`` (moto or SeaweedFS; Azurite)."""
    if endpoint is None:
        return from_url(url, mkdir=url.startswith("file://"))
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme == "az":
        return AzureStore(
            bucket,
            prefix=prefix or None,
            endpoint=endpoint,
            account_name=AZURITE_ACCOUNT,
            account_key=AZURITE_KEY,
            client_options={"allow_http": True},
        )
    return S3Store(
        bucket,
        prefix=prefix or None,
        endpoint=endpoint,
        region=S3_REGION,
        access_key_id=S3_KEY_ID,
        secret_access_key=S3_SECRET,
        client_options={"allow_http": True},
    )


def prompt(index: int) -> JSON:
    """The first step's arguments for job ``index`` (the falflow side uses the same)."""
    return {"prompt": f"a lighthouse at dusk, variation {index}", "seed": index}


async def stream_copy(
    http: httpx.AsyncClient, store: ObjectStore, url: str, key: str, *, verify: bool
) -> tuple[int, str | None]:
    """Stream ``url`` into ``store`` at ``key``; with ``verify``, hash it and check its length."""
    digest = hashlib.sha256() if verify else None
    size = 0
    async with http.stream("GET", url) as response:
        response.raise_for_status()

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in response.aiter_raw(COPY_CHUNK_BYTES):
                if digest is not None:
                    digest.update(chunk)
                size += len(chunk)
                yield chunk

        await obstore.put_async(store, key, chunks())
        expected = response.headers.get("content-length")
    if verify and expected is not None and int(expected) != size:
        raise RuntimeError(f"{url}: got {size} bytes, expected {expected}")
    return size, digest.hexdigest() if digest is not None else None


async def raw_copy_many(
    urls: list[str], bucket_url: str, prefix: str, downloads: int, endpoint: str | None = None
) -> JSON:
    """The archive benchmark's baseline: streaming copies, ``downloads`` at a time, no hashing."""
    store = open_store(bucket_url, endpoint)
    gate = asyncio.Semaphore(downloads)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=_pool(downloads)) as http:

        async def one(index: int, url: str) -> int:
            async with gate:
                size, _ = await stream_copy(http, store, url, f"{prefix}/{index}", verify=False)
                return size

        with stopwatch() as watch:
            sizes = await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
    return {"bytes": sum(sizes), "wall_seconds": watch.wall, "cpu_seconds": watch.cpu}


async def make_requests(endpoint: str, arguments: list[JSON], concurrency: int) -> JSON:
    """Set-up for the archive and cleanup benchmarks (not timed): completed requests' ids and
    outputs."""
    fal = fal_client.AsyncClient(key=os.environ["FAL_KEY"])
    gate = asyncio.Semaphore(concurrency)

    async def one(args: JSON) -> JSON:
        async with gate:
            handle = await fal.submit(endpoint, args)
            return {"request_id": handle.request_id, "output": await handle.get(interval=0.05)}

    return {"requests": await asyncio.gather(*(one(a) for a in arguments))}


def _pool(size: int) -> httpx.Limits:
    return httpx.Limits(max_connections=size, max_keepalive_connections=size)


def output_urls(output: JSON) -> list[str]:
    """The file URLs of the two models used here (``images[].url`` or ``image.url``)."""
    files: list[Any] = list(output.get("images") or [])
    if isinstance(output.get("image"), dict):
        files.append(output["image"])
    return [str(f["url"]) for f in files]


async def two_step_jobs(
    n: int,
    concurrency: int,
    downloads: int,
    deletes: int,
    poll_interval: float,
    bucket_url: str,
    platform_url: str,
    admin_key: str,
    headers: dict[str, str],
    start_timeout: float | None,
) -> JSON:
    """``n`` jobs of text-to-image then upscale of its image, archived, then payloads deleted."""
    fal = fal_client.AsyncClient(key=os.environ["FAL_KEY"])
    store = open_store(bucket_url)
    in_flight = asyncio.Semaphore(concurrency)
    download_gate = asyncio.Semaphore(downloads)
    delete_gate = asyncio.Semaphore(deletes)
    archived_bytes = 0

    async def request(endpoint: str, arguments: JSON) -> tuple[str, JSON]:
        async with in_flight:
            handle = await fal.submit(
                endpoint, arguments, headers=headers, start_timeout=start_timeout
            )
            output: JSON = await handle.get(interval=poll_interval)
            return handle.request_id, output

    async def archive(http: httpx.AsyncClient, prefix: str, arguments: JSON, output: JSON) -> None:
        nonlocal archived_bytes
        async with download_gate:
            for index, url in enumerate(output_urls(output)):
                size, _ = await stream_copy(http, store, url, f"{prefix}/{index}", verify=True)
                archived_bytes += size
            document = json.dumps({"input": arguments, "output": output}).encode()
            await obstore.put_async(store, f"{prefix}/request.json", document)

    async def delete(platform: httpx.AsyncClient, request_id: str) -> None:
        async with delete_gate:
            for attempt in range(10):
                # fal replays a key's answer (errors too) for 10 minutes: a new key per attempt
                response = await platform.delete(
                    f"{platform_url}/models/requests/{request_id}/payloads",
                    headers={"Idempotency-Key": f"delete-{request_id}-{attempt}"},
                )
                # fal answers 404 for a moment after a request completes (its payload row is
                # not written yet): retried like a 429, it is the request's own id after all
                if response.status_code in (404, 429, 500, 502, 503, 504):
                    await asyncio.sleep(float(response.headers.get("retry-after", "0.5")))
                    continue
                response.raise_for_status()
                return
            raise RuntimeError(f"deleting {request_id}: still refused after 10 attempts")

    async def job(http: httpx.AsyncClient, platform: httpx.AsyncClient, index: int) -> None:
        first_args = prompt(index)
        first_id, first = await request(TEXT_TO_IMAGE, first_args)
        await archive(http, f"baseline/{index}/t2i", first_args, first)
        second_args = {"image_url": output_urls(first)[0]}
        second_id, second = await request(IMAGE_TO_IMAGE, second_args)
        await archive(http, f"baseline/{index}/upscale", second_args, second)
        await delete(platform, first_id)
        await delete(platform, second_id)

    # fal_client's own client keeps its defaults (it offers no way to change them); the clients
    # written here keep as many connections alive as they use at once.
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=_pool(downloads)) as http,
        httpx.AsyncClient(
            timeout=httpx.Timeout(60.0),
            limits=_pool(deletes),
            headers={"Authorization": f"Key {admin_key}"},
        ) as platform,
    ):
        with stopwatch() as watch:
            await asyncio.gather(*(job(http, platform, i) for i in range(n)))
    return {
        "jobs": n,
        "requests": 2 * n,
        "archived_bytes": archived_bytes,
        "wall_seconds": watch.wall,
        "cpu_seconds": watch.cpu,
    }
