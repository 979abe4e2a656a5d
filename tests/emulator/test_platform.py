"""The Platform API with raw httpx: keys, payload deletion, idempotency, listing, rate limit; and
how long results and payloads are kept."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from falflow.emulator import RunningEmulator
from tests.support.emulator import submit, wait_completed

ECHO = "emulator/echo"
LIST = "/v1/models/requests/by-endpoint"
DAY = 24 * 3600


def payloads_url(request_id: str) -> str:
    return f"/v1/models/requests/{request_id}/payloads"


def admin(emulator: RunningEmulator, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Key {emulator.admin_key}", **extra}


def completed(http: httpx.Client, endpoint: str, arguments: dict[str, Any], **headers: str) -> str:
    submitted = submit(http, endpoint, arguments, **headers)
    wait_completed(http, submitted["status_url"])
    request_id: str = submitted["request_id"]
    return request_id


def upload(http: httpx.Client, data: bytes) -> str:
    grant = http.post("/rest/storage/auth/token", json={}).json()
    answer = http.post(
        f"{grant['base_url']}/files/upload",
        headers={"Authorization": f"Bearer {grant['token']}", "Content-Type": "image/png"},
        content=data,
    )
    url: str = answer.json()["access_url"]
    return url


def test_keys_and_error_bodies(emulator: RunningEmulator, http: httpx.Client) -> None:
    request_id = completed(http, ECHO, {"output": {}})
    for headers, status in (
        ({"Authorization": ""}, 401),
        ({"Authorization": "Key not-a-key"}, 401),
        ({}, 403),  # the ordinary API key cannot delete
    ):
        answer = http.delete(payloads_url(request_id), headers=headers)
        assert answer.status_code == status
        error = answer.json()["error"]
        assert error["type"] == "authorization_error"
        assert error["message"]
    assert http.get(LIST, params={"endpoint_id": ECHO}).status_code == 200  # API key lists
    assert http.get(LIST, params={"endpoint_id": ECHO}, headers=admin(emulator)).status_code == 200
    assert (
        http.get(LIST, params={"endpoint_id": ECHO}, headers={"Authorization": ""}).status_code
        == 401
    )
    assert http.delete(payloads_url(request_id), headers=admin(emulator)).status_code == 200


def test_deletion_removes_json_and_outputs_never_inputs(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    from falflow.emulator.files import render_png

    images_id = completed(http, "fal-ai/flux/schnell", {"prompt": "p", "num_images": 2})
    images = [i["url"] for i in http.get(f"/fal-ai/flux/requests/{images_id}").json()["images"]]
    source = upload(http, render_png(8, 8, 1))
    upscale_id = completed(http, "fal-ai/esrgan", {"image_url": source})
    upscaled = http.get(f"/fal-ai/esrgan/requests/{upscale_id}").json()["image"]["url"]

    deleted = http.delete(payloads_url(images_id), headers=admin(emulator))
    assert deleted.status_code == 200
    assert deleted.json() == {
        "cdn_delete_results": [{"link": u, "exception": None} for u in images]
    }
    assert [http.get(u).status_code for u in images] == [404, 404]
    assert http.get(f"/fal-ai/flux/requests/{images_id}").status_code == 404

    deleted = http.delete(payloads_url(upscale_id), headers=admin(emulator))
    assert deleted.json()["cdn_delete_results"] == [{"link": upscaled, "exception": None}]
    assert http.get(upscaled).status_code == 404
    assert http.get(source).status_code == 200  # the input file stays
    inventory = emulator.inventory(hashes=False)
    assert inventory["payloads"] == {}
    assert [(f["url"], f["kind"]) for f in inventory["files"]] == [(source, "upload")]

    again = http.delete(payloads_url(images_id), headers=admin(emulator))
    assert again.status_code == 200
    assert again.json() == {"cdn_delete_results": []}
    unknown = http.delete(payloads_url("no-such-request"), headers=admin(emulator))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found"
    running = submit(http, ECHO, {"output": 1, "latency_seconds": 3600})
    busy = http.delete(payloads_url(running["request_id"]), headers=admin(emulator))
    assert busy.status_code == 400
    assert busy.json()["error"]["type"] == "validation_error"


def test_idempotency_key_replays_for_ten_minutes(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    request_id = completed(http, "fal-ai/flux/schnell", {"prompt": "p"})
    first = http.delete(
        payloads_url(request_id), headers=admin(emulator, **{"Idempotency-Key": "k1"})
    )
    assert len(first.json()["cdn_delete_results"]) == 1
    replay = http.delete(
        payloads_url(request_id), headers=admin(emulator, **{"Idempotency-Key": "k1"})
    )
    assert replay.status_code == 200
    assert replay.json() == first.json()
    assert replay.headers["idempotent-replayed"] == "true"
    fresh = http.delete(
        payloads_url(request_id), headers=admin(emulator, **{"Idempotency-Key": "k2"})
    )
    assert fresh.json() == {"cdn_delete_results": []}
    other = completed(http, ECHO, {"output": {}})
    reused = http.delete(payloads_url(other), headers=admin(emulator, **{"Idempotency-Key": "k1"}))
    assert reused.status_code == 422
    emulator.advance_clock(601)
    expired = http.delete(
        payloads_url(request_id), headers=admin(emulator, **{"Idempotency-Key": "k1"})
    )
    assert expired.json() == {"cdn_delete_results": []}
    assert "idempotent-replayed" not in expired.headers


def listing(http: httpx.Client, **params: Any) -> dict[str, Any]:
    answer = http.get(LIST, params={"endpoint_id": ECHO, **params})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_listing_window_cursor_status_and_payloads(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    arguments: list[dict[str, Any]] = [
        {"output": {"n": 1}},
        {"output": {"n": 2}},
        {"fail": {"status": 422, "body": {"detail": [{"type": "bad", "msg": "no"}]}}},
        {"fail": {"status": 500, "body": {"detail": "boom", "error_type": "runner_server_error"}}},
        {"output": {"n": 5}},
    ]
    ids = []
    for index, args in enumerate(arguments):
        ids.append(completed(http, ECHO, args))
        if index < len(arguments) - 1:
            emulator.advance_clock(10)  # distinct sent_at times
    completed(http, "fal-ai/flux/schnell", {"prompt": "another endpoint"})

    everything = listing(http)
    assert everything["has_more"] is False
    assert everything["next_cursor"] is None
    items = everything["items"]
    assert sorted(i["request_id"] for i in items) == sorted(ids)
    assert [i["ended_at"] for i in items] == sorted((i["ended_at"] for i in items), reverse=True)
    assert all("json_input" not in i for i in items)

    pages, cursor = [], None
    while True:
        page = listing(http, limit=2, **({"cursor": cursor} if cursor else {}))
        pages.append([i["request_id"] for i in page["items"]])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
        assert base64.b64decode(cursor).decode() == str(len(pages) + 1)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(rid for page in pages for rid in page) == sorted(ids)

    by_status = {
        s: {i["request_id"] for i in listing(http, status=s)["items"]}
        for s in ("success", "user_error", "error")
    }
    assert by_status == {
        "success": {ids[0], ids[1], ids[4]},
        "user_error": {ids[2]},
        "error": {ids[3]},
    }

    sent = {i["request_id"]: i["sent_at"] for i in items}
    window = listing(http, start=sent[ids[1]], end=sent[ids[3]])  # end is exclusive
    assert {i["request_id"] for i in window["items"]} == {ids[1], ids[2]}

    (one,) = listing(http, request_id=ids[0], expand="payloads")["items"]
    assert one["json_input"] == arguments[0]
    assert one["json_output"] == {"n": 1}
    assert one["status_code"] == 200
    assert one["duration"] >= 0

    both = http.get(LIST, params={"endpoint_id": f"{ECHO},fal-ai/flux/schnell"}).json()
    assert len(both["items"]) == len(ids) + 1
    too_many = http.get(LIST, params=[("endpoint_id", f"e/{n}") for n in range(51)])
    assert too_many.status_code == 400
    assert too_many.json()["error"]["type"] == "validation_error"
    assert http.get(LIST).status_code == 400
    assert http.get(LIST, params={"endpoint_id": ECHO, "limit": 101}).status_code == 400

    emulator.advance_clock(DAY + 60)
    assert listing(http)["items"] == []  # start defaults to 24 h ago...
    assert len(listing(http, request_id=ids[0])["items"]) == 1  # ...or 90 days with request_id


def test_platform_rate_limit_answers_429_with_retry_after(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(platform_rate_per_second=1.0, platform_burst=2)
    answers = [http.get(LIST, params={"endpoint_id": ECHO}) for _ in range(4)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    limited = [a for a in answers if a.status_code == 429]
    assert limited
    assert limited[0].json()["error"]["type"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("store_io", "output", "kept_for"),
    [
        ("1", {"small": True}, 30 * DAY),
        ("0", {"small": True}, 3600),
        ("0", {"large": "x" * 11_000}, 360),
    ],
)
def test_result_retention(
    emulator: RunningEmulator, http: httpx.Client, store_io: str, output: Any, kept_for: int
) -> None:
    submitted = submit(http, ECHO, {"output": output}, **{"X-Fal-Store-IO": store_io})
    wait_completed(http, submitted["status_url"])
    request_id = submitted["request_id"]
    held = emulator.inventory(hashes=False)["payloads"][request_id]
    assert held["output"] is True
    assert held["input"] is (store_io == "1")
    (item,) = listing(http, request_id=request_id, expand="payloads")["items"]
    assert (item["json_output"] is not None) is (store_io == "1")
    emulator.advance_clock(kept_for - 5)
    assert http.get(submitted["response_url"]).json() == output
    emulator.advance_clock(10)
    assert http.get(submitted["response_url"]).status_code == 404
    assert request_id not in emulator.inventory(hashes=False)["payloads"]
    assert http.get(submitted["status_url"]).json()["status"] == "COMPLETED"
