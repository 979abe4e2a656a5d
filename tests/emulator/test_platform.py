"""The Platform API with raw httpx: keys, payload deletion, idempotency, listing, search, rate
limit; and how long results and payloads are kept."""

from __future__ import annotations

import base64
import random
from typing import Any

import httpx
import pytest

from falflow.emulator import EmulatorConfig, Faults, RunningEmulator
from falflow.emulator.clock import iso, micros, parse_iso_micros
from tests.support.emulator import submit, wait_completed

ECHO = "emulator/echo"
FLUX = "fal-ai/flux/schnell"
LIST = "/v1/models/requests/by-endpoint"
SEARCH = "/v1/models/requests/search"
DAY = 24 * 3600
SETTLE = 3.0
"""Past the default payload-row delay (1 s) and listing lag (2 s)."""


def payloads_url(request_id: str) -> str:
    return f"/v1/models/requests/{request_id}/payloads"


def admin(emulator: RunningEmulator, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Key {emulator.admin_key}", **extra}


def completed(http: httpx.Client, endpoint: str, arguments: dict[str, Any], **headers: str) -> str:
    submitted = submit(http, endpoint, arguments, **headers)
    wait_completed(http, submitted["status_url"])
    request_id: str = submitted["request_id"]
    return request_id


def image_urls(http: httpx.Client, request_id: str) -> list[str]:
    return [i["url"] for i in http.get(f"/fal-ai/flux/requests/{request_id}").json()["images"]]


def delete(
    emulator: RunningEmulator, http: httpx.Client, request_id: str, key: str | None = None
) -> httpx.Response:
    extra = {} if key is None else {"Idempotency-Key": key}
    return http.delete(payloads_url(request_id), headers=admin(emulator, **extra))


def upload(http: httpx.Client, data: bytes) -> str:
    grant = http.post("/rest/storage/auth/token", json={}).json()
    answer = http.post(
        f"{grant['base_url']}/files/upload",
        headers={"Authorization": f"Bearer {grant['token']}", "Content-Type": "image/png"},
        content=data,
    )
    url: str = answer.json()["access_url"]
    return url


def test_harsh_defaults() -> None:
    """Where fal's contract is silent the emulator's default is the harsher reading."""
    config = EmulatorConfig()
    assert config.platform_retry_after is False
    assert config.platform_ratelimit_reset is False
    assert config.listing_includes_unstarted is False
    assert config.listing_lag_seconds == 2.0
    assert config.payload_row_delay_seconds == 1.0
    assert config.store_io_off_deletes_files is False
    assert config.redelete_retries_failed_files is False
    assert config.idempotency_ttl_seconds == 600
    assert config.webhook_gateway_id_header is True
    assert config.runner_reads_restricted_inputs is False


def test_keys_and_error_bodies(emulator: RunningEmulator, http: httpx.Client) -> None:
    request_id = completed(http, ECHO, {"output": {}})
    emulator.advance_clock(SETTLE)
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

    images_id = completed(http, FLUX, {"prompt": "p", "num_images": 2})
    images = image_urls(http, images_id)
    source = upload(http, render_png(8, 8, 1))
    upscale_id = completed(http, "fal-ai/esrgan", {"image_url": source})
    upscaled = http.get(f"/fal-ai/esrgan/requests/{upscale_id}").json()["image"]["url"]
    emulator.advance_clock(SETTLE)

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
    request_id = completed(http, FLUX, {"prompt": "p"})
    emulator.advance_clock(SETTLE)
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
    assert reused.status_code == 400
    assert reused.json()["error"]["type"] == "validation_error"
    assert "idempotent-replayed" not in reused.headers
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
    completed(http, FLUX, {"prompt": "another endpoint"})
    emulator.advance_clock(SETTLE)

    everything = listing(http)
    assert everything["has_more"] is False
    assert everything["next_cursor"] is None
    items = everything["items"]
    assert sorted(i["request_id"] for i in items) == sorted(ids)
    assert [i["ended_at"] for i in items] == sorted((i["ended_at"] for i in items), reverse=True)
    assert all("json_input" not in i for i in items)
    assert all(i["started_at"] is not None for i in items)

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

    both = http.get(LIST, params={"endpoint_id": f"{ECHO},{FLUX}"}).json()
    assert len(both["items"]) == len(ids) + 1
    too_many = http.get(LIST, params=[("endpoint_id", f"e/{n}") for n in range(51)])
    assert too_many.status_code == 400
    assert too_many.json()["error"]["type"] == "validation_error"
    assert http.get(LIST).status_code == 400
    assert http.get(LIST, params={"endpoint_id": ECHO, "limit": 101}).status_code == 400

    emulator.advance_clock(DAY + 60)
    assert listing(http)["items"] == []  # start defaults to 24 h ago...
    assert len(listing(http, request_id=ids[0])["items"]) == 1  # ...or 90 days with request_id


def test_platform_rate_limit_answers_429_without_retry_after(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(platform_rate_per_second=1.0, platform_burst=2)
    answers = [http.get(LIST, params={"endpoint_id": ECHO}) for _ in range(4)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    limited = [a for a in answers if a.status_code == 429]
    assert limited
    assert limited[0].json()["error"]["type"] == "rate_limited"
    assert "retry-after" not in limited[0].headers
    assert "x-ratelimit-reset" not in limited[0].headers

    emulator.configure(platform_rate_per_second=0.5, platform_retry_after=True)
    answers = [http.get(SEARCH) for _ in range(4)]  # every operation shares the bucket
    limited = [a for a in answers if a.status_code == 429]
    assert limited
    assert int(limited[0].headers["retry-after"]) >= 1
    assert "x-ratelimit-reset" not in limited[0].headers

    emulator.configure(
        platform_rate_per_second=0.25, platform_retry_after=False, platform_ratelimit_reset=True
    )
    answers = [http.get("/v1/storage/settings") for _ in range(4)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited
    assert int(limited[0].headers["x-ratelimit-reset"]) >= 1
    assert "retry-after" not in limited[0].headers


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
    emulator.advance_clock(SETTLE)
    (item,) = listing(http, request_id=request_id, expand="payloads")["items"]
    assert (item["json_output"] is not None) is (store_io == "1")
    emulator.advance_clock(kept_for - 5 - SETTLE)
    assert http.get(submitted["response_url"]).json() == output
    emulator.advance_clock(10)
    assert http.get(submitted["response_url"]).status_code == 404
    assert request_id not in emulator.inventory(hashes=False)["payloads"]
    assert http.get(submitted["status_url"]).json()["status"] == "COMPLETED"


def test_payload_row_not_written_yet_is_404_and_replayed(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(payload_row_delay_seconds=30)  # wide enough for a loaded machine
    request_id = completed(http, FLUX, {"prompt": "too soon"})
    (url,) = image_urls(http, request_id)
    early = delete(emulator, http, request_id, key="early")
    assert early.status_code == 404
    assert early.json()["error"]["type"] == "not_found"
    assert http.get(url).status_code == 200  # nothing was deleted
    assert request_id in emulator.inventory(hashes=False)["payloads"]

    emulator.advance_clock(31)
    replay = delete(emulator, http, request_id, key="early")  # errors are replayed too
    assert replay.status_code == 404
    assert replay.headers["idempotent-replayed"] == "true"
    assert http.get(url).status_code == 200
    fresh = delete(emulator, http, request_id, key="late")
    assert fresh.status_code == 200
    assert fresh.json() == {"cdn_delete_results": [{"link": url, "exception": None}]}
    assert http.get(url).status_code == 404

    emulator.configure(payload_row_delay_seconds=0)
    at_once = completed(http, FLUX, {"prompt": "at once"})
    assert len(delete(emulator, http, at_once).json()["cdn_delete_results"]) == 1


def test_store_io_off_deletion_finds_no_files(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    hour = '{"expiration_duration_seconds": 3000}'
    headers = {"X-Fal-Store-IO": "0", "X-Fal-Object-Lifecycle-Preference": hour}
    submitted = submit(http, FLUX, {"prompt": "unstored"}, **headers)
    wait_completed(http, submitted["status_url"])
    request_id = submitted["request_id"]
    (url,) = image_urls(http, request_id)
    emulator.advance_clock(SETTLE)
    answer = delete(emulator, http, request_id)
    assert answer.status_code == 200
    assert answer.json() == {"cdn_delete_results": []}
    assert http.get(url).status_code == 200  # the output file is still served...
    assert http.get(submitted["response_url"]).status_code == 200  # ...and the result kept
    # The listing has no stored output to show: it looks deleted, but the file is not.
    (item,) = listing(http, request_id=request_id, expand="payloads", endpoint_id=FLUX)["items"]
    assert item["json_output"] is None
    inventory = emulator.inventory(hashes=False)
    assert [f["url"] for f in inventory["files"]] == [url]
    assert inventory["payloads"][request_id]["output"] is True
    emulator.advance_clock(3000)  # only its lifecycle removes it
    assert http.get(url).status_code == 404

    emulator.configure(store_io_off_deletes_files=True)
    other = submit(http, FLUX, {"prompt": "unstored too"}, **{"X-Fal-Store-IO": "0"})
    wait_completed(http, other["status_url"])
    (other_url,) = image_urls(http, other["request_id"])
    emulator.advance_clock(SETTLE)
    answer = delete(emulator, http, other["request_id"])
    assert answer.json() == {"cdn_delete_results": [{"link": other_url, "exception": None}]}
    assert http.get(other_url).status_code == 404
    assert http.get(other["response_url"]).status_code == 404


def test_partial_cdn_delete_leaves_one_file(emulator: RunningEmulator, http: httpx.Client) -> None:
    emulator.set_faults(Faults(partial_cdn_delete=1.0, seed=3))
    request_id = completed(http, FLUX, {"prompt": "p", "num_images": 3})
    images = image_urls(http, request_id)
    emulator.advance_clock(SETTLE)
    answer = delete(emulator, http, request_id)
    assert answer.status_code == 200
    results = answer.json()["cdn_delete_results"]
    assert [r["link"] for r in results] == images  # every file is listed...
    failed = [r["link"] for r in results if r["exception"] is not None]
    assert len(failed) == 1  # ...one with an exception
    assert isinstance(results[images.index(failed[0])]["exception"], str)
    assert [http.get(u).status_code for u in images] == [
        200 if u == failed[0] else 404 for u in images
    ]
    inventory = emulator.inventory(hashes=False)
    assert [f["url"] for f in inventory["files"]] == failed
    assert request_id not in inventory["payloads"]
    assert emulator.injected_faults() == {"partial_cdn_delete": 1}

    emulator.set_faults(Faults())
    again = delete(emulator, http, request_id)  # the payload is gone: no file to find
    assert again.json() == {"cdn_delete_results": []}
    assert http.get(failed[0]).status_code == 200
    emulator.configure(redelete_retries_failed_files=True)
    retried = delete(emulator, http, request_id)
    assert retried.json() == {"cdn_delete_results": [{"link": failed[0], "exception": None}]}
    assert http.get(failed[0]).status_code == 404


def test_empty_delete_results_deletes_nothing(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.set_faults(Faults(empty_delete_results=1.0))
    request_id = completed(http, FLUX, {"prompt": "p", "num_images": 2})
    images = image_urls(http, request_id)
    emulator.advance_clock(SETTLE)
    answer = delete(emulator, http, request_id)
    assert answer.status_code == 200
    assert answer.json() == {"cdn_delete_results": []}
    assert [http.get(u).status_code for u in images] == [200, 200]
    assert http.get(f"/fal-ai/flux/requests/{request_id}").status_code == 200
    inventory = emulator.inventory(hashes=False)
    assert inventory["payloads"][request_id]["output"] is True
    assert sorted(f["url"] for f in inventory["files"]) == sorted(images)
    assert emulator.injected_faults() == {"empty_delete_results": 1}
    emulator.set_faults(Faults())
    assert len(delete(emulator, http, request_id).json()["cdn_delete_results"]) == 2


def test_listing_shows_started_requests_only_and_lags(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(concurrency_limit=1, listing_lag_seconds=30)
    running = submit(http, ECHO, {"output": 1, "latency_seconds": 100})["request_id"]
    waiting = submit(http, ECHO, {"output": 2})["request_id"]
    cancelled = submit(http, ECHO, {"output": 3})["request_id"]
    assert http.put(f"/emulator/echo/requests/{cancelled}/cancel").status_code == 202
    assert listing(http)["items"] == []  # nothing is listed before the lag has passed

    emulator.advance_clock(30)
    (item,) = listing(http)["items"]  # the queued and the cancelled request never started
    assert item["request_id"] == running
    assert item["started_at"] is not None
    assert (item["ended_at"], item["status_code"], item["duration"]) == (None, None, None)
    emulator.configure(listing_includes_unstarted=True)
    unstarted = {i["request_id"]: i for i in listing(http)["items"]}
    assert set(unstarted) == {running, waiting, cancelled}
    assert unstarted[waiting]["started_at"] is None
    assert unstarted[cancelled]["status_code"] == 499
    emulator.configure(listing_includes_unstarted=False)

    emulator.advance_clock(75)  # `running` ended 5 s ago; `waiting` started and ended then
    (item,) = listing(http, expand="payloads")["items"]
    assert item["request_id"] == running
    assert item["ended_at"] is None  # the completion shows only after the lag
    assert item["json_output"] is None
    assert item["json_input"] == {"output": 1, "latency_seconds": 100}
    assert listing(http, status="success")["items"] == []

    emulator.advance_clock(30)
    items = listing(http, expand="payloads")["items"]
    assert [i["request_id"] for i in items] == [waiting, running]
    assert [i["status_code"] for i in items] == [200, 200]
    assert items[1]["json_output"] == 1
    assert all(i["started_at"] is not None for i in items)
    assert len(listing(http, status="success")["items"]) == 2
    search = http.get(SEARCH, params={"endpoint_id": ECHO}).json()["results"]
    assert {r["request_id"] for r in search} == {running, waiting}  # search: the same rules


def test_listing_window_bounds_at_the_printed_resolution(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(listing_lag_seconds=0)
    ids = [completed(http, ECHO, {"output": n}) for n in range(12)]
    sent = {i["request_id"]: i["sent_at"] for i in listing(http)["items"]}
    assert set(sent) == set(ids)
    for request_id in ids:
        at = sent[request_id]
        included = {i["request_id"] for i in listing(http, start=at)["items"]}
        excluded = {i["request_id"] for i in listing(http, end=at)["items"]}
        assert request_id in included  # start is inclusive...
        assert request_id not in excluded  # ...end exclusive, at the printed microsecond
        assert listing(http, start=at, end=at)["items"] == []


def test_printed_times_round_trip() -> None:
    rng = random.Random(7)
    stamps = [1_764_000_000 + rng.random() * 1e7 for _ in range(20_000)]
    stamps += [1_764_000_000.0000005, 1_764_000_000.0000015, 0.0, 1_764_000_000.999_999_6]
    for stamp in stamps:
        printed = iso(stamp)
        assert printed.endswith("Z")
        assert parse_iso_micros(printed) == micros(stamp)
        assert iso(parse_iso_micros(printed) / 1e6) == printed
    assert parse_iso_micros("2025-01-01") == parse_iso_micros("2025-01-01T00:00:00Z")
    assert parse_iso_micros("2025-01-01T00:00:00.1234567Z") == micros(1735689600.123456)


def search(http: httpx.Client, *params: tuple[str, str]) -> httpx.Response:
    return http.get(SEARCH, params=list(params))


def test_search_newest_first_across_endpoints(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.configure(listing_lag_seconds=0)
    ids = []
    for endpoint, arguments in (
        (ECHO, {"output": 1}),
        (FLUX, {"prompt": "a"}),
        (ECHO, {"output": 2}),
        ("fal-ai/flux/dev", {"prompt": "b"}),
    ):
        ids.append(completed(http, endpoint, arguments))
        emulator.advance_clock(1)
    newest_first = ids[::-1]

    everything = search(http).json()
    assert set(everything) == {"results", "next_cursor", "has_more"}
    assert [r["request_id"] for r in everything["results"]] == newest_first
    assert everything["has_more"] is False
    first = everything["results"][0]
    assert first["endpoint_id"] == "fal-ai/flux/dev"
    assert first["started_at"] is not None
    assert first["status_code"] == 200
    assert "json_input" not in first
    echo = search(http, ("endpoint_id", ECHO)).json()["results"]
    assert [r["request_id"] for r in echo] == [ids[2], ids[0]]
    for params in (
        [("endpoint_id", f"{ECHO},{FLUX}")],
        [("endpoint_id", ECHO), ("endpoint_id", FLUX)],
    ):
        found = [r["request_id"] for r in search(http, *params).json()["results"]]
        assert found == [ids[2], ids[1], ids[0]]
    deprecated = search(http, ("endpoint", FLUX)).json()["results"]
    assert [r["request_id"] for r in deprecated] == [ids[1]]
    only_api = search(http, ("only_api_requests", "true")).json()["results"]
    assert len(only_api) == 4
    assert search(http, ("exclude_api_requests", "true")).json()["results"] == []

    pages, cursor = [], None
    while True:
        params = [("limit", "3")] + ([("cursor", cursor)] if cursor else [])
        page = search(http, *params).json()
        pages.append([r["request_id"] for r in page["results"]])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert pages == [newest_first[:3], newest_first[3:]]
    emulator.configure(search_max_limit=2)
    capped = search(http, ("limit", "100")).json()  # fewer than asked for: follow next_cursor
    assert len(capped["results"]) == 2
    assert capped["has_more"] is True

    for params, status, error_type in (
        (
            [("only_api_requests", "true"), ("exclude_api_requests", "true")],
            400,
            "validation_error",
        ),
        ([("endpoint_id", ",".join(f"e/{n}" for n in range(51)))], 400, "validation_error"),
        ([("limit", "0")], 400, "validation_error"),
        ([("min_similarity", "2")], 400, "validation_error"),
        ([("query", "a lighthouse")], 501, "not_implemented"),
    ):
        answer = search(http, *params)
        assert answer.status_code == status, params
        assert answer.json()["error"]["type"] == error_type
    assert http.get(SEARCH, headers={"Authorization": ""}).status_code == 401
    assert http.get(SEARCH, headers=admin(emulator)).status_code == 200
