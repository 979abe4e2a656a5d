"""Uploads as fal_client makes them: CDN token, single-shot, multipart, the storage fallback;
their lifecycle; and models reading them back."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import fal_client
import httpx
import pytest
from fal_client.client import FalClientHTTPError, StorageSettings

from falflow.emulator import RunningEmulator
from falflow.emulator.files import render_png


def stored(emulator: RunningEmulator, url: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [f for f in emulator.inventory()["files"] if f["url"] == url]
    assert len(found) == 1
    return found[0]


def lifetime(record: dict[str, Any]) -> float | None:
    if record["expires_at"] is None:
        return None
    expires = datetime.fromisoformat(record["expires_at"])
    return (expires - datetime.fromisoformat(record["created_at"])).total_seconds()


def test_upload_file_records_the_lifecycle_and_expires(
    fal: RunningEmulator, http: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "input.png"
    path.write_bytes(render_png(64, 48, 1))
    url = fal_client.SyncClient(key=fal.api_key).upload_file(
        path, lifecycle=StorageSettings(expires_in="1h")
    )
    assert url.startswith(f"{fal.base_url}/cdn/files/")
    assert url.endswith("/input.png")
    record = stored(fal, url)
    assert record["kind"] == "upload"
    assert record["request_id"] is None
    assert record["content_type"] == "image/png"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lifetime(record) == 3600
    assert http.get(url).content == path.read_bytes()
    fal.advance_clock(3601)
    assert http.get(url).status_code == 404
    assert fal.inventory()["files"] == []


def test_async_upload_lifecycles_and_account_default(fal: RunningEmulator) -> None:
    async def upload(lifecycle: StorageSettings | None) -> str:
        client = fal_client.AsyncClient(key=fal.api_key)
        url: str = await client.upload(b"{}", "application/json", "a.json", lifecycle=lifecycle)
        return url

    two_minutes = asyncio.run(upload(StorageSettings(expires_in=120)))
    never = asyncio.run(upload(StorageSettings(expires_in="never")))
    assert lifetime(stored(fal, two_minutes)) == 120
    assert lifetime(stored(fal, never)) is None  # "never" sends no header: the account default
    fal.configure(default_expiration_seconds=600)
    assert lifetime(stored(fal, asyncio.run(upload(None)))) == 600


def test_storage_fallback_when_the_cdn_upload_fails(
    fal: RunningEmulator, http: httpx.Client
) -> None:
    fal.configure(v3_upload_available=False)
    url = fal_client.SyncClient(key=fal.api_key).upload(
        b"fallback", "text/plain", "f.txt", lifecycle=StorageSettings(expires_in="1d")
    )
    assert http.get(url).content == b"fallback"
    assert lifetime(stored(fal, url)) == 86400


def test_multipart_routes(emulator: RunningEmulator, http: httpx.Client) -> None:
    token = http.post("/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={})
    assert token.status_code == 200
    grant = token.json()
    assert datetime.fromisoformat(grant["expires_at"]).tzinfo is not None
    cdn = {"Authorization": f"{grant['token_type']} {grant['token']}"}
    created = http.post(
        f"{grant['base_url']}/files/upload/multipart",
        headers={
            **cdn,
            "Content-Type": "video/mp4",
            "X-Fal-File-Name": "clip.mp4",
            "X-Fal-Object-Lifecycle": '{"expiration_duration_seconds": 300}',
        },
    ).json()
    access_url, upload_id = created["access_url"], created["uploadId"]
    parts = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    etags = {}
    for number in (3, 1, 2):  # parts may arrive in any order
        answer = http.put(
            f"{access_url}/multipart/{upload_id}/{number}", headers=cdn, content=parts[number - 1]
        )
        etags[number] = answer.headers["etag"]
    assert http.get(access_url).status_code == 404  # not complete yet
    wrong = http.post(
        f"{access_url}/multipart/{upload_id}/complete",
        headers=cdn,
        json={"parts": [{"partNumber": 1, "etag": '"0"'}]},
    )
    assert wrong.status_code == 400
    done = http.post(
        f"{access_url}/multipart/{upload_id}/complete",
        headers=cdn,
        json={"parts": [{"partNumber": n, "etag": etags[n]} for n in (2, 3, 1)]},
    )
    assert done.json() == {"access_url": access_url}
    assert http.get(access_url).content == b"".join(parts)
    assert lifetime(stored(emulator, access_url)) == 300
    bad_token = http.post(
        f"{grant['base_url']}/files/upload",
        headers={"Authorization": "Bearer nope", "Content-Type": "text/plain"},
        content=b"x",
    )
    assert bad_token.status_code == 401


def test_fal_client_multipart_upload_over_100_mb(fal: RunningEmulator) -> None:
    """fal_client's own multipart path, reached the only unpatched way: a > 100 MB upload."""
    data = bytes(range(256)) * (100 * 1024 * 1024 // 256 + 1)

    async def upload() -> str:
        client = fal_client.AsyncClient(key=fal.api_key)
        url: str = await client.upload(
            data, "application/octet-stream", "big.bin", lifecycle=StorageSettings(expires_in=60)
        )
        return url

    url = asyncio.run(upload())
    record = stored(fal, url)
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert lifetime(record) == 60


def test_models_read_uploads_and_fail_like_fal_when_gone(fal: RunningEmulator) -> None:
    client = fal_client.SyncClient(key=fal.api_key)
    url = client.upload(render_png(40, 30, 2), "image/png", "small.png")
    upscaled = client.subscribe("fal-ai/esrgan", {"image_url": url, "scale": 4}, interval=0.01)
    image = upscaled["image"]
    assert (image["width"], image["height"]) == (160, 120)
    assert image["content_type"] == "image/png"
    assert stored(fal, image["url"])["size"] == image["file_size"]

    short = client.upload(b"gone soon", "image/png", "gone.png", lifecycle=StorageSettings(60))
    fal.advance_clock(61)
    for endpoint, arguments in (
        ("fal-ai/esrgan", {"image_url": short}),
        ("fal-ai/kling-video/v2.1/standard/image-to-video", {"prompt": "p", "image_url": short}),
        ("fal-ai/esrgan", {"image_url": "https://example.com/elsewhere.png"}),
    ):
        with pytest.raises(FalClientHTTPError) as caught:
            client.subscribe(endpoint, arguments, interval=0.01)
        assert caught.value.status_code == 422
        assert caught.value.response.json()["detail"][0]["type"] == "file_download_error"
