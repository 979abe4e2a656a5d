"""Input files uploaded to fal's CDN under the retention policy's upload lifecycle.

Payload deletion never removes input files: their expiry (``upload_ttl_seconds``) is the only
cleanup fal gives them, so every upload is also hidden when the run's scope ends.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path

import anyio
from fal_client.client import StorageSettings

from falflow.settings import RetentionPolicy
from falflow.tasks.http import request_with_retries
from falflow.tasks.outputs import check_source
from falflow.tasks.runtime import Runtime

SMALL_UPLOAD_BYTES = 100 * 1024 * 1024
"""fal's CDN takes a file this large in one POST (larger ones go in parts)."""


async def upload_input(
    rt: Runtime,
    data: Path | str | bytes,
    *,
    content_type: str | None = None,
    file_name: str | None = None,
    policy: RetentionPolicy | None = None,
) -> str:
    """Upload an input file to fal's CDN with the policy's upload lifecycle; returns its URL.

    ``data`` is a local path (type guessed from its name) or the bytes themselves (described by
    ``content_type`` and ``file_name``). Payload deletion never removes input files, so their
    expiry (``upload_ttl_seconds``, default a day) is the only cleanup they get. An upload TTL of
    "never" is sent as an explicit ``null`` expiry: ``fal_client`` would send no lifecycle at
    all, and the account's default (maybe shorter, maybe public) would apply instead.

    Raises:
        ValueError: "never" for a file over 100 MB (only ``fal_client``'s multipart upload takes
            those, and it cannot say "never").
    """
    url = await _upload(rt, data, content_type, file_name, policy)
    rt.uploads.append(url)  # hidden when the run's scope ends
    return url


async def _upload(
    rt: Runtime,
    data: Path | str | bytes,
    content_type: str | None,
    file_name: str | None,
    policy: RetentionPolicy | None,
) -> str:
    ttl = (policy or rt.settings.retention).upload_ttl_seconds
    if ttl is not None:
        lifecycle = StorageSettings(expires_in=ttl)
        if isinstance(data, bytes):
            kind = content_type or "application/octet-stream"
            return str(await rt.fal.upload(data, kind, file_name, lifecycle=lifecycle))
        return str(await rt.fal.upload_file(Path(data), lifecycle=lifecycle))
    if not isinstance(data, bytes):
        path = Path(data)
        file_name = file_name or path.name
        content_type = content_type or mimetypes.guess_type(path.name)[0]
        data = await anyio.Path(path).read_bytes()
    if len(data) > SMALL_UPLOAD_BYTES:
        raise ValueError(
            "an upload TTL of 'never' works for files up to 100 MB: set "
            "FALFLOW_RETENTION__UPLOAD_TTL_SECONDS for larger inputs"
        )
    return await _upload_never_expiring(
        rt, data, content_type or "application/octet-stream", file_name or "upload.bin"
    )


async def _upload_never_expiring(
    rt: Runtime, data: bytes, content_type: str, file_name: str
) -> str:
    """fal's single-POST CDN upload with ``{"expiration_duration_seconds": null}``."""
    fal = rt.settings.fal
    auth = await request_with_retries(
        rt.http,
        "POST",
        f"{fal.rest_url}/storage/auth/token",
        params={"storage_type": "fal-cdn-v3"},
        headers=rt.fal_headers(),
        json={},
    )
    auth.raise_for_status()
    token = auth.json()
    base = str(token.get("base_url") or fal.cdn_url)
    check_source(base + "/files/upload", fal.cdn_hosts)  # the key's token goes to fal only
    lifecycle = json.dumps({"expiration_duration_seconds": None})
    # not retried: a second POST would leave a second, never-expiring copy
    response = await rt.http.post(
        f"{base}/files/upload",
        content=data,
        headers={
            "Authorization": f"{token.get('token_type')} {token.get('token')}",
            "Content-Type": content_type,
            "X-Fal-File-Name": file_name,
            "X-Fal-Object-Lifecycle": lifecycle,
            "X-Fal-Object-Lifecycle-Preference": lifecycle,
        },
    )
    response.raise_for_status()
    return str(response.json()["access_url"])
