"""The fal webhook receiver against deliveries signed by the emulator (docs/fal-protocol.md §7)."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio
import fal_client
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prefect.events.clients import EventsClient, PrefectEventsClient

from falflow.emulator import RunningEmulator, WebhookDelivery, webhook_body
from falflow.settings import SettingsError, load_settings
from falflow.tasks.falhosts import configure_fal_client
from falflow.webhooks import COMPLETED_EVENT, FAILED_EVENT, JwksCache, event_id, jwks_url
from tests.support.receiver import (
    EmittedEvents,
    RunningReceiver,
    free_port,
    receiver_settings,
    serve_receiver,
)

OUTPUT = {"images": [{"url": "https://v3.fal.media/files/secret-looking/x.png"}], "seed": 7}


def new_id() -> str:
    return f"req-{uuid.uuid4().hex[:12]}"


def signed(emulator: RunningEmulator, request_id: str, **kwargs: object) -> WebhookDelivery:
    timestamp = kwargs.pop("timestamp", None)
    user_id = kwargs.pop("user_id", None)
    body = webhook_body(request_id, kwargs.pop("payload", OUTPUT), **kwargs)  # type: ignore[arg-type]
    return emulator.sign_webhook(request_id, body, timestamp=timestamp, user_id=user_id)  # type: ignore[arg-type]


def test_genuine_delivery_emits_one_completed_event_without_the_output(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    delivery = signed(emulator, request_id)
    answer = receiver.deliver(delivery)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "accepted"

    [event] = events.named(COMPLETED_EVENT)
    assert event.id == event_id(request_id)
    assert event.resource.id == f"fal.request.{request_id}"
    assert event.resource["fal.user-id"] == "emulator-user"
    assert event.payload["request_id"] == request_id
    assert event.payload["status"] == "OK"
    assert event.payload["has_output"] is True
    stamp = int(delivery.headers["x-fal-webhook-timestamp"])
    assert event.occurred == datetime.fromtimestamp(stamp, UTC)
    # neither the output's CDN URLs nor any key travel in the event
    text = event.model_dump_json()
    assert "v3.fal.media" not in text
    assert emulator.api_key not in text
    assert emulator.admin_key not in text
    assert events.named(FAILED_EVENT) == []


def test_error_delivery_emits_failed_with_fals_error(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    error_body = {
        "detail": [
            {"loc": ["body", "prompt"], "msg": "blocked", "type": "content_policy_violation"}
        ]
    }
    delivery = signed(
        emulator, request_id, payload=error_body, status="ERROR", error="Invalid status code: 422"
    )
    assert receiver.deliver(delivery).status_code == 200
    [event] = events.named(FAILED_EVENT)
    assert event.payload["status"] == "ERROR"
    assert event.payload["error"] == "Invalid status code: 422"
    assert events.named(COMPLETED_EVENT) == []


def test_ok_with_payload_error_is_completed_without_output(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    delivery = signed(emulator, request_id, payload=None, payload_error="payload too large")
    assert receiver.deliver(delivery).status_code == 200
    [event] = events.named(COMPLETED_EVENT)
    assert event.payload["has_output"] is False
    assert event.payload["payload_error"] == "payload too large"


def test_replayed_delivery_is_acknowledged_but_not_emitted_again(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    first = signed(emulator, request_id)
    assert receiver.deliver(first).json()["status"] == "accepted"
    # the same bytes again, and a fresh retry fal signs later for the same request
    again = receiver.deliver(first)
    retry = receiver.deliver(signed(emulator, request_id, timestamp=int(time.time()) + 1))
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert (retry.status_code, retry.json()["status"]) == (200, "duplicate")
    assert len(events.named(COMPLETED_EVENT)) == 1


def test_forged_signature_is_rejected(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    genuine = signed(emulator, request_id)
    h = genuine.headers
    message = "\n".join(
        [request_id, h["x-fal-webhook-user-id"], h["x-fal-webhook-timestamp"], _sha(genuine.body)]
    )
    forged = Ed25519PrivateKey.generate().sign(message.encode()).hex()
    answer = receiver.deliver(genuine, x_fal_webhook_signature=forged)
    assert answer.status_code == 401
    assert "signature" in answer.json()["error"]
    flipped = bytearray(bytes.fromhex(h["x-fal-webhook-signature"]))
    flipped[0] ^= 1
    assert receiver.deliver(genuine, x_fal_webhook_signature=flipped.hex()).status_code == 401
    assert receiver.deliver(genuine, x_fal_webhook_signature="not-hex").status_code == 400
    assert events.all() == []
    # the genuine delivery still goes through: rejected ones were not remembered
    assert receiver.deliver(genuine).status_code == 200


def test_tampered_body_or_headers_are_rejected(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id = new_id()
    genuine = signed(emulator, request_id)
    body = json.loads(genuine.body)
    body["status"] = "ERROR"
    tampered = WebhookDelivery(json.dumps(body).encode(), genuine.headers)
    assert receiver.deliver(tampered).status_code == 401
    assert receiver.deliver(genuine, x_fal_webhook_request_id=new_id()).status_code == 401
    assert receiver.deliver(genuine, x_fal_webhook_user_id="someone-else").status_code == 401
    later = str(int(genuine.headers["x-fal-webhook-timestamp"]) + 5)
    assert receiver.deliver(genuine, x_fal_webhook_timestamp=later).status_code == 401
    assert events.all() == []


@pytest.mark.parametrize(
    "header",
    [
        "x-fal-webhook-request-id",
        "x-fal-webhook-user-id",
        "x-fal-webhook-timestamp",
        "x-fal-webhook-signature",
    ],
)
def test_a_missing_header_is_rejected(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents, header: str
) -> None:
    answer = receiver.deliver(signed(emulator, new_id()), **{header: None})
    assert answer.status_code == 400
    assert header in answer.json()["error"].lower()
    assert events.all() == []


def test_stale_and_future_deliveries_are_rejected_inside_tolerance_accepted(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    now = int(time.time())
    for stamp in (now - 301 - 5, now + 301 + 5):
        answer = receiver.deliver(signed(emulator, new_id(), timestamp=stamp))
        assert answer.status_code == 401, stamp
        assert "from now" in answer.json()["error"]
    assert events.all() == []
    fresh_enough = signed(emulator, new_id(), timestamp=now - 290)
    assert receiver.deliver(fresh_enough).status_code == 200
    assert len(events.named(COMPLETED_EVENT)) == 1


def test_tolerance_is_configurable(emulator: RunningEmulator, events: EmittedEvents) -> None:
    with serve_receiver(
        receiver_settings(emulator, tolerance_seconds=10), events.client
    ) as receiver:
        old = signed(emulator, new_id(), timestamp=int(time.time()) - 60)
        assert receiver.deliver(old).status_code == 401
    assert events.all() == []


def test_body_must_match_the_signed_request_id(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    signed_id, other_id = new_id(), new_id()
    delivery = emulator.sign_webhook(signed_id, webhook_body(other_id, OUTPUT))
    answer = receiver.deliver(delivery)
    assert answer.status_code == 400
    assert "request_id" in answer.json()["error"]
    not_json = emulator.sign_webhook(signed_id, b"not json")
    assert receiver.deliver(not_json).status_code == 400
    assert events.all() == []


def test_a_retried_requests_delivery_signed_with_its_gateway_id_is_accepted(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    request_id, gateway_id = new_id(), new_id()
    body = webhook_body(request_id, OUTPUT, gateway_request_id=gateway_id)
    answer = receiver.deliver(emulator.sign_webhook(gateway_id, body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["request_id"] == request_id
    [event] = events.named(COMPLETED_EVENT)
    assert event.id == event_id(request_id)  # the request's own id, whatever id was signed
    assert event.payload["gateway_request_id"] == gateway_id
    again = receiver.deliver(emulator.sign_webhook(request_id, body))
    assert again.json()["status"] == "duplicate"  # one request, one event


def test_only_allowed_fal_users_are_accepted(
    emulator: RunningEmulator, events: EmittedEvents
) -> None:
    settings = receiver_settings(emulator, allowed_user_ids=("emulator-user",))
    with serve_receiver(settings, events.client) as receiver:
        stranger = signed(emulator, new_id(), user_id="someone-elses-account")
        assert receiver.deliver(stranger).status_code == 403
        assert events.all() == []
        assert receiver.deliver(signed(emulator, new_id())).status_code == 200
    assert len(events.named(COMPLETED_EVENT)) == 1


def test_oversized_body_is_refused(emulator: RunningEmulator, events: EmittedEvents) -> None:
    with serve_receiver(
        receiver_settings(emulator, max_body_bytes=2048), events.client
    ) as receiver:
        big = signed(emulator, new_id(), payload={"text": "x" * 4096})
        assert receiver.deliver(big).status_code == 413
    assert events.all() == []


def test_rotated_key_is_fetched_once_and_unknown_keys_do_not_flood_the_jwks(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    try:
        assert receiver.deliver(signed(emulator, new_id())).status_code == 200
        assert receiver.receiver.jwks.fetches == 1
        emulator.rotate_webhook_key(keep_previous=False)
        # signed with a key the receiver has not seen: one refetch, then accepted
        assert receiver.deliver(signed(emulator, new_id())).status_code == 200
        assert receiver.receiver.jwks.fetches == 2
        # forgeries right after cannot make it fetch again within the refetch interval
        genuine = signed(emulator, new_id())
        for _ in range(5):
            forged = Ed25519PrivateKey.generate().sign(b"whatever").hex()
            assert receiver.deliver(genuine, x_fal_webhook_signature=forged).status_code == 401
        assert receiver.receiver.jwks.fetches == 2
        assert len(events.named(COMPLETED_EVENT)) == 2
    finally:
        emulator.reset()


def test_keys_are_refetched_after_their_max_age(emulator: RunningEmulator) -> None:
    ca = emulator.fal_settings().ca_bundle
    assert ca is not None
    now = [1000.0]

    async def main() -> None:
        verify = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=verify) as http:
            cache = JwksCache(
                emulator.jwks_url,
                http,
                max_age_seconds=3600,
                refetch_interval_seconds=60,
                clock=lambda: now[0],
            )
            first = await cache.keys()
            now[0] += 3599
            assert await cache.keys() == first
            assert cache.fetches == 1
            now[0] += 1
            await cache.keys()
            assert cache.fetches == 2
            # unknown-key refetches: at most one per refetch interval
            assert await cache.refetch_for_unknown_key() is not None
            assert await cache.refetch_for_unknown_key() is None
            now[0] += 59
            assert await cache.refetch_for_unknown_key() is None
            assert cache.fetches == 3
            now[0] += 1
            assert await cache.refetch_for_unknown_key() is not None
            assert cache.fetches == 4

    anyio.run(main)


def test_unreachable_jwks_answers_503_so_fal_retries(
    emulator: RunningEmulator, events: EmittedEvents
) -> None:
    closed = f"https://127.0.0.1:{free_port()}/.well-known/jwks.json"
    with serve_receiver(receiver_settings(emulator, jwks_url=closed), events.client) as receiver:
        answer = receiver.deliver(signed(emulator, new_id()))
        assert answer.status_code == 503
        assert "retry" in answer.json()["error"]
    assert events.all() == []


def test_unreachable_prefect_answers_503_and_the_redelivery_goes_through(
    emulator: RunningEmulator, events: EmittedEvents
) -> None:
    """Acknowledged only once Prefect has the event: fal redelivers what was not."""
    down = f"http://127.0.0.1:{free_port()}/api"
    clients = iter([lambda: PrefectEventsClient(api_url=down, reconnection_attempts=0)])

    def client() -> EventsClient:  # Prefect is down at first, then back
        return next(clients, events.client)()

    with serve_receiver(receiver_settings(emulator), client) as receiver:
        delivery = signed(emulator, new_id())
        answer = receiver.deliver(delivery)
        assert answer.status_code == 503
        assert "retry" in answer.json()["error"]
        assert events.all() == []
        again = receiver.deliver(delivery)
        assert (again.status_code, again.json()["status"]) == (200, "accepted")
    assert len(events.named(COMPLETED_EVENT)) == 1


def test_real_delivery_from_a_webhook_submit(
    emulator: RunningEmulator, receiver: RunningReceiver, events: EmittedEvents
) -> None:
    """fal_client submits with ``webhook_url``; the emulator delivers, signed, to the receiver."""
    configure_fal_client(emulator.fal_settings())

    async def submit() -> str:
        client = fal_client.AsyncClient(key=emulator.api_key)
        handle = await client.submit(
            "fal-ai/flux/schnell", {"prompt": "a red fox"}, webhook_url=receiver.url
        )
        return str(handle.request_id)

    request_id = anyio.run(submit)
    deadline = time.monotonic() + 20
    while not events.named(COMPLETED_EVENT) and time.monotonic() < deadline:
        time.sleep(0.1)
    [event] = events.named(COMPLETED_EVENT)
    assert event.payload["request_id"] == request_id
    attempts = [a for a in emulator.webhook_attempts() if a["request_id"] == request_id]
    assert [a.get("status_code") for a in attempts] == [200]


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def test_webhook_settings_come_from_the_environment_and_refuse_plain_http_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in ("FALFLOW_FAL__REST_URL", "FALFLOW_WEBHOOKS__JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FALFLOW_WEBHOOKS__ALLOWED_USER_IDS", '["user-a", "user-b"]')
    monkeypatch.setenv("FALFLOW_WEBHOOKS__TOLERANCE_SECONDS", "60")
    loaded = load_settings()
    assert loaded.webhooks.allowed_user_ids == ("user-a", "user-b")
    assert loaded.webhooks.tolerance_seconds == 60
    assert jwks_url(loaded) == "https://rest.fal.ai/.well-known/jwks.json"
    monkeypatch.setenv("FALFLOW_WEBHOOKS__JWKS_URL", "http://keys.example/jwks.json")
    with pytest.raises(SettingsError, match="FALFLOW_WEBHOOKS__JWKS_URL: must be an https://"):
        load_settings()
