"""Webhook deliveries: signed like fal's, verified here with cryptography's own Ed25519 against
the emulator's JWKS; retried on failure; under the gateway id for retried requests; and
forgeable for receiver tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fal_client
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from falflow.emulator import Faults, RunningEmulator, webhook_body

HEADERS = ("request-id", "user-id", "timestamp", "signature")


@dataclass
class Receiver:
    url: str
    answers: list[int]
    """Status codes to answer in turn (200 once they run out)."""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} deliveries"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="", answers=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(state.answers.pop(0) if state.answers else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/fal/webhook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def jwks(emulator: RunningEmulator) -> list[Ed25519PublicKey]:
    keys = httpx.get(emulator.jwks_url, verify=str(emulator.ca_cert)).json()["keys"]
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in keys)
    return [
        Ed25519PublicKey.from_public_bytes(
            base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4))
        )
        for k in keys
    ]


def verifies(keys: list[Ed25519PublicKey], headers: dict[str, str], body: bytes) -> bool:
    """fal's rule: request_id, user_id, timestamp and hex(sha256(body)), newline-joined."""
    values = [headers[f"x-fal-webhook-{name}"] for name in HEADERS]
    message = "\n".join([*values[:3], hashlib.sha256(body).hexdigest()]).encode()
    for key in keys:
        try:
            key.verify(bytes.fromhex(values[3]), message)
        except InvalidSignature:
            continue
        return True
    return False


def test_completion_is_delivered_signed_without_polling(
    fal: RunningEmulator, receiver: Receiver
) -> None:
    async def submit() -> str:
        client = fal_client.AsyncClient(key=fal.api_key)
        handle = await client.submit(
            "fal-ai/flux/schnell", {"prompt": "hooked"}, webhook_url=receiver.url
        )
        return handle.request_id

    request_id = asyncio.run(submit())
    receiver.wait_for(1)  # nobody asks for the status: the emulator's timer completes it
    headers, body = receiver.received[0]
    assert headers["x-fal-webhook-request-id"] == request_id
    assert headers["x-fal-webhook-user-id"] == fal.current_config().user_id
    assert abs(int(headers["x-fal-webhook-timestamp"]) - time.time()) < 300
    assert verifies(jwks(fal), headers, body)
    delivered = json.loads(body)
    assert delivered["request_id"] == delivered["gateway_request_id"] == request_id
    assert delivered["status"] == "OK"
    result = fal_client.SyncClient(key=fal.api_key).result("fal-ai/flux/schnell", request_id)
    assert delivered["payload"] == result


def test_failed_deliveries_are_retried_and_errors_delivered(
    fal: RunningEmulator, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    handle = fal_client.SyncClient(key=fal.api_key).submit(
        "fal-ai/flux/dev", {"prompt": "forbidden fruit"}, webhook_url=receiver.url
    )
    receiver.wait_for(3)
    attempts = fal.webhook_attempts()
    assert [(a["attempt"], a.get("status_code")) for a in attempts] == [
        (1, 500),
        (2, 503),
        (3, 200),
    ]
    bodies = [json.loads(body) for _, body in receiver.received]
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["request_id"] == handle.request_id
    assert bodies[0]["status"] == "ERROR"
    assert bodies[0]["error"] == "Invalid status code: 422"
    assert bodies[0]["payload"]["detail"][0]["type"] == "content_policy_violation"


def test_forged_and_rotated_signatures(emulator: RunningEmulator) -> None:
    body = webhook_body("req-1", {"images": []})
    genuine = emulator.sign_webhook("req-1", body, timestamp=1_700_000_000)
    assert json.loads(genuine.body) == body
    assert genuine.headers["x-fal-webhook-timestamp"] == "1700000000"
    keys = jwks(emulator)
    assert verifies(keys, genuine.headers, genuine.body)
    assert not verifies(keys, genuine.headers, genuine.body + b" ")
    assert not verifies(
        keys, {**genuine.headers, "x-fal-webhook-request-id": "req-2"}, genuine.body
    )

    emulator.rotate_webhook_key(keep_previous=True)
    assert len(jwks(emulator)) == 2
    assert verifies(jwks(emulator), genuine.headers, genuine.body)
    emulator.rotate_webhook_key()
    assert len(jwks(emulator)) == 1
    assert not verifies(jwks(emulator), genuine.headers, genuine.body)
    fresh = emulator.sign_webhook("req-1", b"raw bytes", user_id="someone")
    assert fresh.headers["x-fal-webhook-user-id"] == "someone"
    assert verifies(jwks(emulator), fresh.headers, fresh.body)


def test_a_retried_request_is_delivered_under_its_gateway_id(
    fal: RunningEmulator, receiver: Receiver
) -> None:
    fal.set_faults(Faults(runner_retry=1.0))
    client = fal_client.SyncClient(key=fal.api_key)
    handle = client.submit("fal-ai/flux/schnell", {"prompt": "again"}, webhook_url=receiver.url)
    receiver.wait_for(1)
    headers, body = receiver.received[0]
    delivered = json.loads(body)
    assert delivered["request_id"] == handle.request_id
    gateway_id = delivered["gateway_request_id"]
    assert gateway_id != handle.request_id
    assert headers["x-fal-webhook-request-id"] == gateway_id
    keys = jwks(fal)
    assert verifies(keys, headers, body)  # signed with the id in the header...
    rebuilt = {**headers, "x-fal-webhook-request-id": handle.request_id}
    assert not verifies(keys, rebuilt, body)  # ...not with the body's request_id
    assert delivered["status"] == "OK"
    assert delivered["payload"] == client.result("fal-ai/flux/schnell", handle.request_id)
    (described,) = [r for r in fal.requests() if r["request_id"] == handle.request_id]
    assert (described["runs"], described["gateway_request_id"]) == (2, gateway_id)
    assert fal.webhook_attempts()[0]["header_request_id"] == gateway_id
    assert fal.injected_faults() == {"runner_retry": 1}

    fal.configure(webhook_gateway_id_header=False)
    second = client.submit("fal-ai/flux/schnell", {"prompt": "twice"}, webhook_url=receiver.url)
    receiver.wait_for(2)
    headers, body = receiver.received[1]
    assert headers["x-fal-webhook-request-id"] == second.request_id
    assert json.loads(body)["gateway_request_id"] != second.request_id
    assert verifies(keys, headers, body)


def test_every_request_can_have_its_own_gateway_id(
    emulator: RunningEmulator, http: httpx.Client, receiver: Receiver
) -> None:
    emulator.configure(always_new_gateway_id=True)
    answer = http.post(
        "/fal-ai/flux/schnell", params={"fal_webhook": receiver.url}, json={"prompt": "p"}
    ).json()
    assert answer["gateway_request_id"] != answer["request_id"]
    receiver.wait_for(1)
    headers, body = receiver.received[0]
    assert headers["x-fal-webhook-request-id"] == answer["gateway_request_id"]
    delivered = json.loads(body)
    assert (delivered["request_id"], delivered["gateway_request_id"]) == (
        answer["request_id"],
        answer["gateway_request_id"],
    )
    assert verifies(jwks(emulator), headers, body)
