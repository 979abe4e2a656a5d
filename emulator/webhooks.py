"""Webhook deliveries signed like fal's (docs/fal-protocol.md §7), the JWKS that verifies them, and
helpers to forge deliveries for receiver tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

if TYPE_CHECKING:
    from falflow.emulator.app import Emulator


@dataclass(frozen=True)
class WebhookDelivery:
    """One delivery as it goes on the wire: the raw body and fal's four signature headers."""

    body: bytes
    headers: dict[str, str]


def webhook_body(
    request_id: str,
    payload: Any,
    *,
    status: str = "OK",
    error: str | None = None,
    payload_error: str | None = None,
    gateway_request_id: str | None = None,
) -> dict[str, Any]:
    """The JSON fal POSTs: ``payload`` is the output (or the error body when ``status`` is
    ERROR); it may be None with ``payload_error`` set. ``gateway_request_id`` defaults to
    ``request_id`` (they differ for a request fal retried)."""
    body: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id or request_id,
        "status": status,
        "payload": payload,
    }
    if error is not None:
        body["error"] = error
    if payload_error is not None:
        body["payload_error"] = payload_error
    return body


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class WebhookSigner:
    """Ed25519 keys, newest first; all of them are published in the JWKS."""

    def __init__(self) -> None:
        self._keys = [Ed25519PrivateKey.generate()]

    def rotate(self, keep_previous: bool = False) -> None:
        """Sign with a new key from now on; drop the old ones unless ``keep_previous``."""
        fresh = Ed25519PrivateKey.generate()
        self._keys = [fresh, *self._keys] if keep_previous else [fresh]

    def jwks(self) -> dict[str, Any]:
        keys = []
        for key in self._keys:
            raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            keys.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url(raw),
                    "kid": hashlib.sha256(raw).hexdigest()[:16],
                    "use": "sig",
                    "alg": "EdDSA",
                }
            )
        return {"keys": keys}

    def sign(
        self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None
    ) -> WebhookDelivery:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join([request_id, user_id, stamp, hashlib.sha256(body).hexdigest()])
        signature = self._keys[0].sign(message.encode()).hex()
        return WebhookDelivery(
            body,
            {
                "content-type": "application/json",
                "x-fal-webhook-request-id": request_id,
                "x-fal-webhook-user-id": user_id,
                "x-fal-webhook-timestamp": stamp,
                "x-fal-webhook-signature": signature,
            },
        )


class WebhookSender:
    """Delivers with retries (doubling delays), signing each attempt with a fresh timestamp."""

    def __init__(self, emu: Emulator, ca_bundle: Path | None) -> None:
        self.emu = emu
        self.signer = WebhookSigner()
        self.attempts: list[dict[str, Any]] = []
        self._ca_bundle = ca_bundle
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(
        self,
        url: str,
        request_id: str,
        body: dict[str, Any],
        *,
        header_request_id: str | None = None,
    ) -> None:
        """Deliver ``body`` for ``request_id``; ``X-Fal-Webhook-Request-Id`` (and so the
        signature) carries ``header_request_id`` when given (a retried request's gateway id)."""
        task = asyncio.get_running_loop().create_task(
            self._deliver(url, request_id, header_request_id or request_id, body)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self._ca_bundle is not None:
                verify = ssl.create_default_context(cafile=str(self._ca_bundle))
            self._client = httpx.AsyncClient(verify=verify)
        return self._client

    async def _deliver(
        self, url: str, request_id: str, header_id: str, body: dict[str, Any]
    ) -> None:
        raw = json.dumps(body).encode()
        config = self.emu.config
        for attempt in range(1, config.webhook_attempts + 1):
            delivery = self.signer.sign(header_id, config.user_id, raw)
            record: dict[str, Any] = {
                "request_id": request_id,
                "header_request_id": header_id,
                "url": url,
                "attempt": attempt,
            }
            try:
                answer = await self._http().post(
                    url,
                    content=delivery.body,
                    headers=delivery.headers,
                    timeout=config.webhook_timeout_seconds,
                )
                record["status_code"] = answer.status_code
            except httpx.HTTPError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            self.attempts.append(record)
            if 200 <= record.get("status_code", 0) < 300:
                return
            if attempt < config.webhook_attempts:
                await asyncio.sleep(config.webhook_retry_seconds * 2 ** (attempt - 1))

    def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.attempts.clear()

    async def aclose(self) -> None:
        self.reset()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
