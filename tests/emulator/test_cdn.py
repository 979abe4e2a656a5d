"""The CDN with raw httpx: output lifecycles, ACLs and signed URLs, Range, synthetic large files,
and download faults."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
import pytest

from falflow.emulator import Faults, RunningEmulator
from falflow.emulator.files import render_png
from tests.support.emulator import lifecycle, run, submit, wait_completed

VIDEO = "fal-ai/kling-video/v2.1/standard/image-to-video"
GIB = 1024**3


def image_url(http: httpx.Client, **headers: str) -> str:
    url: str = run(http, "fal-ai/flux/schnell", {"prompt": "cdn"}, **headers)["images"][0]["url"]
    return url


def test_output_lifecycle_from_the_submit_header(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    short = image_url(http, **{"X-Fal-Object-Lifecycle-Preference": lifecycle(120)})
    forever = image_url(http, **{"X-Fal-Object-Lifecycle-Preference": lifecycle(None)})
    zero = image_url(http, **{"X-Fal-Object-Lifecycle-Preference": lifecycle(0)})
    default = image_url(http)
    emulator.advance_clock(119)
    assert http.get(short).status_code == 200
    emulator.advance_clock(2)
    gone = http.get(short)
    assert gone.status_code == 404
    for url in (forever, zero, default):
        assert http.get(url).status_code == 200
    kept = {f["url"]: f["acl"] for f in emulator.inventory(hashes=False)["files"]}
    assert kept == {forever: "allow", zero: "allow", default: "allow"}
    bad = http.post(
        "/fal-ai/flux/schnell",
        json={"prompt": "x"},
        headers={"X-Fal-Object-Lifecycle-Preference": "soon"},
    )
    assert bad.status_code == 400


def test_range_head_and_content_headers(http: httpx.Client) -> None:
    url = image_url(http)
    whole = http.get(url)
    size = len(whole.content)
    assert whole.headers["content-type"] == "image/png"
    assert whole.headers["content-length"] == str(size)
    assert whole.headers["accept-ranges"] == "bytes"
    head = http.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert head.content == b""
    cases = {"bytes=0-7": (0, 8), "bytes=10-": (10, size), "bytes=-4": (size - 4, size)}
    for spec, (start, end) in cases.items():
        part = http.get(url, headers={"Range": spec})
        assert part.status_code == 206, spec
        assert part.content == whole.content[start:end], spec
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
    unsatisfiable = http.get(url, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"


def test_large_video_is_streamed_from_its_seed(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    upload = http.post("/rest/storage/auth/token", json={}).json()
    source = http.post(
        f"{upload['base_url']}/files/upload",
        headers={"Authorization": f"Bearer {upload['token']}", "Content-Type": "image/png"},
        content=b"frame",
    ).json()["access_url"]
    emulator.configure(video_size_bytes=3 * 1024 * 1024 + 5)
    small = run(http, VIDEO, {"prompt": "a lake", "image_url": source})["video"]
    digest = hashlib.sha256()
    with http.stream("GET", small["url"]) as body:
        for chunk in body.iter_bytes():
            digest.update(chunk)
    (record,) = [f for f in emulator.inventory()["files"] if f["url"] == small["url"]]
    assert record["sha256"] == digest.hexdigest()
    assert record["size"] == small["file_size"]

    emulator.configure(video_size_bytes=GIB)  # served chunk by chunk, never held whole
    video = run(http, VIDEO, {"prompt": "a river", "image_url": source})["video"]
    assert video["file_size"] == GIB
    assert video["content_type"] == "video/mp4"
    head = http.head(video["url"])
    assert head.headers["content-length"] == str(GIB)
    tail = http.get(video["url"], headers={"Range": f"bytes={GIB - 100}-"})
    assert tail.status_code == 206
    assert len(tail.content) == 100
    start = http.get(video["url"], headers={"Range": "bytes=0-11"})
    assert start.content[4:12] == b"ftypisom"


def test_truncated_download_announces_the_full_length(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    url = image_url(http)
    size = len(http.get(url).content)
    emulator.set_faults(Faults(truncated_download=1.0))
    chunks: list[bytes] = []
    with http.stream("GET", url) as body:
        assert body.headers["content-length"] == str(size)
        with pytest.raises(httpx.RemoteProtocolError):
            chunks.extend(body.iter_bytes())
    assert 0 < len(b"".join(chunks)) < size
    assert emulator.injected_faults() == {"truncated_download": 1}


def test_connection_reset_drops_the_connection_without_an_answer(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.set_faults(Faults(connection_reset=1.0))
    for path in ("/fal-ai/flux/schnell", "/cdn/files/x/y.png", "/v1/models/requests/by-endpoint"):
        with pytest.raises(httpx.TransportError):
            http.post(path, json={}) if path.startswith("/fal") else http.get(path)
    emulator.set_faults(Faults(slow_answer=1.0, slow_seconds=0.2))
    assert http.get("/rest/.well-known/jwks.json").status_code == 200
    assert emulator.injected_faults() == {"slow_answer": 1}
    assert emulator.requests() == []


def sign(http: httpx.Client, url: str, seconds: int) -> str:
    answer = http.post(
        "/v1/storage/files/sign", params={"url": url}, json={"expiration_seconds": seconds}
    )
    assert answer.status_code == 200, answer.text
    signed: str = answer.json()["signed_url"]
    return signed


def set_acl(http: httpx.Client, url: str, default: str) -> None:
    answer = http.put("/v1/storage/files/acl", params={"url": url}, json={"default": default})
    assert answer.status_code == 200, answer.text


def upload(http: httpx.Client, data: bytes, lifecycle: Any = None) -> str:
    grant = http.post("/rest/storage/auth/token", json={}).json()
    headers = {"Authorization": f"Bearer {grant['token']}", "Content-Type": "image/png"}
    if lifecycle is not None:
        headers["X-Fal-Object-Lifecycle"] = json.dumps(lifecycle)
    url: str = http.post(f"{grant['base_url']}/files/upload", headers=headers, content=data).json()[
        "access_url"
    ]
    return url


def test_output_acl_from_the_submit_header(emulator: RunningEmulator, http: httpx.Client) -> None:
    preference = json.dumps({"initial_acl": {"default": "forbid", "rules": []}})
    forbidden = image_url(http, **{"X-Fal-Object-Lifecycle-Preference": preference})
    hidden = image_url(
        http, **{"X-Fal-Object-Lifecycle-Preference": '{"initial_acl": {"default": "hide"}}'}
    )
    public = image_url(http)
    assert [http.get(u).status_code for u in (forbidden, hidden, public)] == [403, 404, 200]
    files = {f["url"]: f for f in emulator.inventory(hashes=False)["files"]}
    assert {u: (files[u]["acl"], files[u]["expires_at"]) for u in (forbidden, hidden, public)} == {
        forbidden: ("forbid", None),  # only the ACL was chosen: the account's lifetime (forever)
        hidden: ("hide", None),
        public: ("allow", None),
    }
    bad = http.post(
        "/fal-ai/flux/schnell",
        json={"prompt": "x"},
        headers={"X-Fal-Object-Lifecycle-Preference": '{"initial_acl": {"default": "secret"}}'},
    )
    assert bad.status_code == 400


def test_signed_urls_serve_whatever_the_acl_until_they_expire(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    url = upload(http, b"0123456789", lifecycle={"expiration_duration_seconds": 3600})
    set_acl(http, url, "hide")
    signed = sign(http, url, 60)
    assert http.get(url).status_code == 404
    assert http.get(signed).content == b"0123456789"
    part = http.get(signed, headers={"Range": "bytes=2-4"})
    assert (part.status_code, part.content) == (206, b"234")
    assert http.head(signed).status_code == 200
    assert http.get(url + "?identity=made-up").status_code == 403
    other = upload(http, b"other")
    token = signed.partition("?identity=")[2]
    assert http.get(f"{other}?identity={token}").status_code == 403  # signed for another file
    set_acl(http, url, "forbid")
    assert http.get(signed).status_code == 200
    assert http.get(url).status_code == 403

    emulator.advance_clock(61)
    assert http.get(signed).status_code == 403  # expired
    longer = sign(http, url, 7 * 24 * 3600)
    assert http.get(longer).status_code == 200
    (record,) = [f for f in emulator.inventory(hashes=False)["files"] if f["url"] == url]
    assert record["acl"] == "forbid"  # served only if signed, still held
    emulator.advance_clock(3600)
    assert http.get(longer).status_code == 404  # the file expired: gone even when signed
    assert url not in {f["url"] for f in emulator.inventory(hashes=False)["files"]}


def test_deleted_output_is_404_even_when_signed(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    submitted = submit(http, "fal-ai/flux/schnell", {"prompt": "signed"})
    wait_completed(http, submitted["status_url"])
    url = http.get(submitted["response_url"]).json()["images"][0]["url"]
    signed = sign(http, url, 3600)
    assert http.get(signed).status_code == 200
    emulator.advance_clock(3)
    deleted = http.delete(
        f"/v1/models/requests/{submitted['request_id']}/payloads",
        headers={"Authorization": f"Key {emulator.admin_key}"},
    )
    assert deleted.json()["cdn_delete_results"] == [{"link": url, "exception": None}]
    assert http.get(signed).status_code == 404
    assert http.get(url).status_code == 404


def test_models_read_restricted_inputs_only_through_signed_urls(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    source = upload(http, render_png(16, 16, 3), lifecycle={"initial_acl": {"default": "forbid"}})
    refused = run(http, "fal-ai/esrgan", {"image_url": source})
    assert refused["detail"][0]["type"] == "file_download_error"
    upscaled = run(http, "fal-ai/esrgan", {"image_url": sign(http, source, 600)})
    assert upscaled["image"]["width"] == 32
    emulator.configure(runner_reads_restricted_inputs=True)
    assert run(http, "fal-ai/esrgan", {"image_url": source})["image"]["width"] == 32
