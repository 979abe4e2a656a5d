"""The emulator as one ASGI app: fal's queue, REST, CDN and Platform API on one server, fault
injection in front of them, and ``/_emulator/...`` for inspection and control."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from falflow.emulator.cdn import CdnStore
from falflow.emulator.clock import Clock, iso
from falflow.emulator.config import EmulatorConfig, Faults, StorageSettings
from falflow.emulator.faults import FaultInjector
from falflow.emulator.http import (
    AbortConnection,
    HttpError,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    abort_connection,
    dumps,
    json_response,
    send_response,
)
from falflow.emulator.platform import PlatformService
from falflow.emulator.queue import QueueService
from falflow.emulator.webhooks import WebhookSender

logger = logging.getLogger("emulator")

NGINX_503 = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_FAULT_FIELDS = (
    "rate_limit_429",
    "ingress_503",
    "connection_reset",
    "truncated_download",
    "slow_answer",
    "model_error",
    "lost_submit_answer",
)


class Emulator:
    """All of the emulator's state; every part reads ``config`` and ``clock`` from here."""

    def __init__(self, config: EmulatorConfig, *, base_url: str, ca_bundle: Path | None) -> None:
        self.initial = config.model_copy(deep=True)
        self.base_url = base_url
        self.config = config.model_copy(deep=True)  # never mutate the caller's object
        self.clock = Clock()
        self.faults = FaultInjector(config.faults)
        self.webhooks = WebhookSender(self, ca_bundle)
        self.cdn = CdnStore(self)
        self.queue = QueueService(self)
        self.platform = PlatformService(self)
        self._faulty = False
        self.set_faults(config.faults)

    def set_faults(self, faults: Faults) -> None:
        self.config.faults = faults
        self.faults.set(faults)
        self._faulty = any(getattr(faults, name) > 0 for name in _FAULT_FIELDS)

    def reset(self) -> None:
        """Back to the start: configuration, faults and clock as started; storage settings as
        the configuration seeds them; no requests, files, upload tokens, signed URLs,
        idempotency keys or webhook deliveries. The webhook signing key stays."""
        self.queue.close()
        self.webhooks.reset()
        self.config = self.initial.model_copy(deep=True)
        self.clock = Clock()
        self.set_faults(self.config.faults)
        self.cdn = CdnStore(self)
        self.queue = QueueService(self)
        self.platform = PlatformService(self)

    async def aclose(self) -> None:
        self.queue.close()
        await self.webhooks.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive, send)
        try:
            try:
                response = await self._dispatch(request)
            except HttpError as exc:
                response = json_response(exc.status, exc.body, headers=exc.headers)
            except AbortConnection:
                raise
            except Exception:
                logger.exception("emulator failed on %s %s", request.method, request.path)
                response = json_response(
                    500, {"detail": "Emulator internal error", "error_type": "internal_error"}
                )
            await send_response(request, response)
        except AbortConnection:
            await abort_connection(send)
        finally:
            request.close()

    async def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/_emulator/"):
            return await self._control(request, path.removeprefix("/_emulator/"))
        if self._faulty:
            injected = await self._inject_faults(request)
            if injected is not None:
                return injected
        if path.startswith("/cdn/"):
            return await self.cdn.handle(request, path.removeprefix("/cdn/"))
        if path.startswith("/rest/"):
            return await self._rest(request, path.removeprefix("/rest/"))
        if path.startswith("/v1/"):
            return await self.platform.handle(request, path.removeprefix("/v1/"))
        self._authorize(request)
        return await self.queue.handle(request)

    async def _inject_faults(self, request: Request) -> Response | None:
        draw = self.faults.draw
        if draw("slow_answer"):
            await asyncio.sleep(self.faults.faults.slow_seconds)
        if draw("connection_reset"):
            raise AbortConnection
        if draw("ingress_503"):
            return Response(503, NGINX_503, content_type=b"text/html", fal_request_id=False)
        is_queue = not request.path.startswith(("/cdn/", "/rest/", "/v1/"))
        if is_queue and draw("rate_limit_429"):
            return json_response(
                429, {"detail": "Too many requests: slow down", "error_type": "rate_limited"}
            )
        return None

    def _authorize(self, request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "key" or key not in (self.config.api_key, self.config.admin_key):
            raise HttpError(
                401,
                {"detail": "Unauthorized: send 'Authorization: Key <FAL_KEY>' with a valid key"},
            )

    async def _rest(self, request: Request, path: str) -> Response:
        if path == ".well-known/jwks.json" and request.method == "GET":
            return Response(200, dumps(self.webhooks.signer.jwks()))
        if request.method == "POST" and path == "storage/auth/token":
            self._authorize(request)
            await request.body()
            return Response(200, dumps(self.cdn.issue_token()))
        if request.method == "POST" and path == "storage/upload/initiate":
            self._authorize(request)
            return await self.cdn.initiate_upload(request)
        raise HttpError(404, {"detail": "Not found"})

    # -- /_emulator ------------------------------------------------------------------------------

    async def _control(self, request: Request, path: str) -> Response:
        method = request.method
        try:
            if method == "GET" and path == "health":
                return json_response(200, {"ok": True, "now": iso(self.clock.now())})
            if method == "GET" and path == "config":
                return json_response(200, self.config.model_dump(mode="json"))
            if method == "PUT" and path == "config":
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise HttpError(422, {"detail": "expected an object of config fields"})
                merged = {**self.config.model_dump(), **changes}
                self.config = EmulatorConfig.model_validate(merged)
                if "faults" in changes:
                    self.set_faults(self.config.faults)
                if {"default_expiration_seconds", "default_initial_acl"} & changes.keys():
                    self.cdn.set_settings(self.config.seed_storage_settings())
                return json_response(200, self.config.model_dump(mode="json"))
            if method == "GET" and path == "storage-settings":
                return json_response(200, self.cdn.settings.model_dump(mode="json"))
            if method == "PUT" and path == "storage-settings":
                saved = self.cdn.set_settings(StorageSettings.model_validate(await request.json()))
                return json_response(200, saved.model_dump(mode="json"))
            if method == "PUT" and path == "faults":
                self.set_faults(Faults.model_validate(await request.json() or {}))
                return json_response(200, self.config.faults.model_dump(mode="json"))
            if method == "GET" and path == "faults":
                faults = self.config.faults.model_dump(mode="json")
                return json_response(200, {**faults, "injected": dict(self.faults.injected)})
            if method == "POST" and path == "reset":
                self.reset()
                return json_response(200, {"ok": True})
            if method == "GET" and path == "inventory":
                hashes = request.arg("hashes") not in ("0", "false")
                return json_response(
                    200,
                    {
                        "now": iso(self.clock.now()),
                        "payloads": self.queue.payload_inventory(),
                        "files": await self.cdn.inventory(hashes),
                    },
                )
            if method == "GET" and path == "requests":
                self.queue.advance()
                described = [self.queue.describe(r) for r in self.queue.requests.values()]
                return json_response(200, described)
            if method == "POST" and path == "clock":
                body = await request.json() or {}
                self.clock.advance(float(body.get("advance_seconds", 0)))
                self.queue.advance()
                return json_response(200, {"now": iso(self.clock.now())})
            if method == "GET" and path == "webhooks":
                return json_response(200, self.webhooks.attempts)
            if method == "POST" and path == "webhooks/sign":
                return json_response(200, self._sign(await request.json()))
            if method == "POST" and path == "webhooks/rotate":
                body = await request.json() or {}
                self.webhooks.signer.rotate(keep_previous=bool(body.get("keep_previous")))
                return json_response(200, self.webhooks.signer.jwks())
        except ValidationError as exc:
            raise HttpError(422, {"detail": exc.errors(include_url=False)}) from None
        except (TypeError, ValueError) as exc:
            raise HttpError(422, {"detail": str(exc)}) from None
        raise HttpError(404, {"detail": f"No emulator control {method} /_emulator/{path}"})

    def _sign(self, spec: Any) -> dict[str, Any]:
        if not isinstance(spec, dict) or not isinstance(spec.get("request_id"), str):
            raise HttpError(422, {"detail": "expected {request_id, body_b64, timestamp?}"})
        try:
            body = base64.b64decode(spec.get("body_b64", ""), validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(422, {"detail": "body_b64 must be base64"}) from None
        timestamp = spec.get("timestamp")
        delivery = self.webhooks.signer.sign(
            spec["request_id"],
            str(spec.get("user_id") or self.config.user_id),
            body,
            None if timestamp is None else int(timestamp),
        )
        return {"body_b64": base64.b64encode(delivery.body).decode(), "headers": delivery.headers}
