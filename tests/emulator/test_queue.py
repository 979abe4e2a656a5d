"""The queue API, driven by the unmodified fal_client (async and sync) and checked raw where
fal_client hides the wire (status codes, headers, shapes)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from typing import Any

import fal_client
import httpx
import pytest
from fal_client.client import Completed, FalClientHTTPError, InProgress, Queued

from falflow.emulator import Faults, RunningEmulator
from tests.support.emulator import wait_completed

FLUX = "fal-ai/flux/schnell"
ECHO = "emulator/echo"
SLOW = {"output": {"ok": True}, "latency_seconds": 3600}


def test_async_submit_status_events_result(fal: RunningEmulator) -> None:
    async def scenario() -> None:
        client = fal_client.AsyncClient(key=fal.api_key)
        handle = await client.submit(
            FLUX, {"prompt": "a lighthouse", "num_images": 2, "image_size": "square"}
        )
        assert handle.response_url == f"{fal.base_url}/fal-ai/flux/requests/{handle.request_id}"
        first = await handle.status(with_logs=True)
        assert isinstance(first, Queued | InProgress | Completed)
        events = [event async for event in handle.iter_events(with_logs=True, interval=0.01)]
        last = events[-1]
        assert isinstance(last, Completed)
        assert last.error is None
        assert last.logs
        assert {"message", "timestamp", "level", "source"} <= set(last.logs[0])
        assert last.metrics["inference_time"] > 0
        result = await handle.get()
        assert result["prompt"] == "a lighthouse"
        assert result["has_nsfw_concepts"] == [False, False]
        assert [(i["width"], i["height"], i["content_type"]) for i in result["images"]] == [
            (512, 512, "image/png")
        ] * 2
        async with httpx.AsyncClient(verify=str(fal.ca_bundle)) as http:
            image = await http.get(result["images"][0]["url"])
        assert image.status_code == 200
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert struct.unpack(">II", image.content[16:24]) == (512, 512)

    asyncio.run(scenario())
    files = {f["url"]: f for f in fal.inventory()["files"]}
    assert len(files) == 2
    assert all(f["kind"] == "output" and f["expires_at"] is None for f in files.values())


def test_sync_subscribe_reports_queue_updates_and_logs(fal: RunningEmulator) -> None:
    client = fal_client.SyncClient(key=fal.api_key)
    updates: list[object] = []
    enqueued: list[str] = []
    result = client.subscribe(
        ECHO,
        {"output": {"answer": 42}},
        with_logs=True,
        interval=0.01,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )
    assert result == {"answer": 42}
    assert len(enqueued) == 1
    last = updates[-1]
    assert isinstance(last, Completed)
    assert last.logs is not None
    assert last.logs == [
        {
            "message": "Echoing",
            "level": "INFO",
            "source": "user",
            "timestamp": last.logs[0]["timestamp"],
        }
    ]
    status = client.status(ECHO, enqueued[0], with_logs=False)
    assert isinstance(status, Completed)
    assert status.logs is None


def test_wire_shapes_of_status_and_result(fal: RunningEmulator, http: httpx.Client) -> None:
    fal.configure(concurrency_limit=1)
    running = http.post(f"/{ECHO}", json=SLOW).json()
    queued = http.post(f"/{FLUX}", json={"prompt": "queued"}).json()
    assert queued["status"] == "IN_QUEUE"
    assert queued["queue_position"] == 0
    assert queued["response_url"].endswith(f"/fal-ai/flux/requests/{queued['request_id']}")

    waiting = http.get(queued["status_url"])
    assert waiting.status_code == 202
    assert waiting.headers["x-fal-request-id"] == queued["request_id"]
    assert waiting.json()["queue_position"] == 0

    for logs, expect_list in (("true", True), ("1", True), ("false", False), ("0", False)):
        answer = http.get(running["status_url"], params={"logs": logs})
        assert answer.status_code == 202
        body = answer.json()
        assert body["status"] == "IN_PROGRESS"
        assert "logs" in body
        assert isinstance(body["logs"], list) is expect_list
        assert {"request_id", "response_url", "status_url", "cancel_url"} <= set(body)

    early = http.get(running["response_url"])
    assert early.status_code == 400
    assert early.json() == {"detail": "Request is still in progress"}

    assert http.put(running["cancel_url"]).status_code == 202
    done = wait_completed(http, queued["status_url"])
    assert done["metrics"]["inference_time"] > 0
    assert done["logs"] is None
    assert "error" not in done
    request_id = queued["request_id"]
    for path in (
        f"/fal-ai/flux/requests/{request_id}",
        f"/fal-ai/flux/schnell/requests/{request_id}",
        f"/fal-ai/flux/requests/{request_id}/response",
    ):
        result = http.get(path)
        assert result.status_code == 200, path
        assert result.headers["x-fal-request-id"] == request_id
        assert result.json()["prompt"] == "queued"

    for method, suffix in (("GET", "/status"), ("GET", ""), ("PUT", "/cancel")):
        missing = http.request(method, f"/fal-ai/flux/requests/no-such-id{suffix}")
        assert missing.status_code == 404
        assert missing.json() == {"status": "NOT_FOUND"}
        assert "x-fal-request-id" in missing.headers
    assert (
        http.get(f"/fal-ai/flux/requests/{request_id}", headers={"Authorization": ""}).status_code
        == 401
    )


def test_cancel_in_every_state(fal: RunningEmulator) -> None:
    fal.configure(concurrency_limit=1)

    async def scenario() -> None:
        client = fal_client.AsyncClient(key=fal.api_key)
        running = await client.submit(ECHO, SLOW)
        queued = await client.submit(ECHO, {"output": 1})
        assert await queued.status() == Queued(position=0)
        await queued.cancel()
        cancelled = await queued.status()
        assert isinstance(cancelled, Completed)
        assert cancelled.error_type == "client_cancelled"

        assert isinstance(await running.status(), InProgress)
        await running.cancel()
        stopped = await running.status()
        assert isinstance(stopped, Completed)
        assert stopped.error_type == "client_cancelled"
        with pytest.raises(FalClientHTTPError) as result_error:
            await running.get()
        assert result_error.value.status_code == 499

        finished = await client.submit(ECHO, {"output": {"n": 2}})
        assert await finished.get() == {"n": 2}
        with pytest.raises(FalClientHTTPError) as late:
            await finished.cancel()
        assert late.value.status_code == 400
        assert late.value.response.json() == {"status": "ALREADY_COMPLETED"}

        with pytest.raises(FalClientHTTPError) as unknown:
            await client.cancel(ECHO, "00000000-0000-0000-0000-000000000000")
        assert unknown.value.status_code == 404

    asyncio.run(scenario())


def test_failures_are_completed_with_the_model_error(fal: RunningEmulator) -> None:
    client = fal_client.SyncClient(key=fal.api_key)
    handle = client.submit("fal-ai/flux/dev", {"prompt": "something forbidden"})
    events = list(handle.iter_events(interval=0.01))
    failed = events[-1]
    assert isinstance(failed, Completed)
    assert failed.error_type == "content_policy_violation"
    assert failed.error
    with pytest.raises(FalClientHTTPError) as caught:
        handle.get()
    assert caught.value.status_code == 422
    detail = caught.value.response.json()["detail"]
    assert detail[0]["type"] == "content_policy_violation"
    assert detail[0]["loc"] == ["body", "prompt"]

    fal.set_faults(Faults(model_error=1.0))
    broken = client.submit(ECHO, {"output": 1})
    with pytest.raises(FalClientHTTPError) as runner:
        broken.get(interval=0.01)
    assert runner.value.status_code == 500
    assert runner.value.error_type == "runner_server_error"


def seed_striking_first(probability: float) -> int:
    """A seed whose first draw strikes and whose second does not (faults draw from
    ``random.Random(seed)``, once per enabled fault per call)."""
    return next(
        seed
        for seed in range(1000)
        if (rng := random.Random(seed)).random() < probability and rng.random() >= probability
    )


@pytest.mark.parametrize("fault", ["rate_limit_429", "ingress_503", "connection_reset"])
def test_fal_client_retries_the_fault_and_succeeds(fal: RunningEmulator, fault: str) -> None:
    faults = Faults.model_validate({fault: 0.3, "seed": seed_striking_first(0.3)})
    fal.set_faults(faults)  # the submit is struck first, then fal_client retries it
    client = fal_client.SyncClient(key=fal.api_key)
    assert client.subscribe(ECHO, {"output": {"via": "sync"}}, interval=0.01) == {"via": "sync"}
    assert fal.injected_faults()[fault] >= 1

    async def scenario() -> Any:
        return await fal_client.AsyncClient(key=fal.api_key).subscribe(
            ECHO, {"output": {"via": "async"}}, interval=0.01
        )

    fal.set_faults(faults)
    assert asyncio.run(scenario()) == {"via": "async"}
    assert fal.injected_faults()[fault] >= 1
    # Faults strike before a request is processed: the retries created no duplicate.
    assert [r["status"] for r in fal.requests()] == ["COMPLETED", "COMPLETED"]


def test_ingress_503_looks_like_a_proxy_and_429_like_fal(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    emulator.set_faults(Faults(ingress_503=1.0))
    proxy = http.post(f"/{ECHO}", json={"output": 1})
    assert proxy.status_code == 503
    assert "x-fal-request-id" not in proxy.headers
    assert "nginx" in proxy.text
    emulator.set_faults(Faults(rate_limit_429=1.0))
    limited = http.post(f"/{ECHO}", json={"output": 1})
    assert limited.status_code == 429
    assert "x-fal-request-id" in limited.headers
    assert emulator.requests() == []


def test_lost_submit_answer_leaves_an_orphan(fal: RunningEmulator) -> None:
    fal.set_faults(Faults(lost_submit_answer=0.5, seed=seed_striking_first(0.5)))
    handle = fal_client.SyncClient(key=fal.api_key).submit(ECHO, {"output": 1})
    submitted = fal.requests()
    assert len(submitted) == 2
    assert submitted[1]["request_id"] == handle.request_id
    assert submitted[0]["request_id"] != handle.request_id


def test_priority_concurrency_limit_and_queue_length(
    fal: RunningEmulator, http: httpx.Client
) -> None:
    fal.configure(concurrency_limit=1)
    http.post(f"/{ECHO}", json=SLOW)
    low = http.post(f"/{ECHO}", json=SLOW, headers={"X-Fal-Queue-Priority": "low"}).json()
    normal = http.post(f"/{ECHO}", json=SLOW).json()
    assert http.get(normal["status_url"]).json()["queue_position"] == 0
    assert http.get(low["status_url"]).json()["queue_position"] == 1
    full = http.post(f"/{ECHO}", json=SLOW, params={"fal_max_queue_length": 2})
    assert full.status_code == 429
    assert http.post(f"/{ECHO}", json=SLOW, params={"fal_max_queue_length": 3}).status_code == 200
    states = sorted(r["status"] for r in fal.requests())
    assert states == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE", "IN_QUEUE"]


def test_start_timeout_expires_in_the_queue(fal: RunningEmulator) -> None:
    fal.configure(concurrency_limit=1)
    client = fal_client.SyncClient(key=fal.api_key)
    client.submit(ECHO, SLOW)
    late = client.submit(ECHO, {"output": 1}, start_timeout=5)
    assert late.status() == Queued(position=0)
    fal.advance_clock(6)
    expired = late.status()
    assert isinstance(expired, Completed)
    assert expired.error_type == "request_timeout"
    with pytest.raises(FalClientHTTPError) as caught:
        late.get()
    assert caught.value.status_code == 504
    assert caught.value.response_headers["x-fal-request-timeout-type"] == "user"


def test_runner_retry_requeues_the_request_and_runs_it_again(
    fal: RunningEmulator, http: httpx.Client
) -> None:
    fal.set_faults(Faults(runner_retry=1.0))
    submitted = http.post(
        f"/{ECHO}",
        json={"output": "ok", "latency_seconds": 5},
        headers={"X-Fal-Request-Timeout": "1"},
    ).json()
    assert submitted["gateway_request_id"] == submitted["request_id"]
    fal.advance_clock(5.5)  # the first run failed at 5 s; it was re-queued and runs again
    assert http.get(submitted["status_url"]).json()["status"] == "IN_PROGRESS"
    (described,) = fal.requests()
    assert described["runs"] == 2
    assert described["gateway_request_id"] != submitted["request_id"]
    fal.advance_clock(5)  # its start deadline was met the first time: no 504
    assert http.get(submitted["status_url"]).status_code == 200
    assert http.get(submitted["response_url"]).json() == "ok"


def test_status_stream_sends_each_status_until_completed(
    fal: RunningEmulator, http: httpx.Client
) -> None:
    fal.configure(concurrency_limit=1)
    blocker = http.post(f"/{ECHO}", json={"output": 0, "latency_seconds": 0.3}).json()
    queued = http.post(f"/{ECHO}", json={"output": 1, "latency_seconds": 0.2}).json()
    events = []
    with http.stream("GET", queued["status_url"] + "/stream", params={"logs": "1"}) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    states = [event["status"] for event in events]
    assert states[0] == "IN_QUEUE"
    assert states[-1] == "COMPLETED"
    assert "IN_PROGRESS" in states
    assert events[-1]["logs"][0]["message"] == "Echoing"
    assert http.get(blocker["status_url"]).status_code == 200


def test_env_var_route_in_a_fresh_process(emulator: RunningEmulator) -> None:
    """Only the documented route: FAL_* and SSL_CERT_FILE exported before importing fal_client."""
    script = textwrap.dedent(
        """
        import json, fal_client
        result = fal_client.subscribe("emulator/echo", {"output": {"via": "env"}}, interval=0.01)
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **emulator.client_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"via": "env"}
    assert [r["endpoint_id"] for r in emulator.requests()] == [ECHO]
