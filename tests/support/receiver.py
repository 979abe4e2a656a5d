"""Helpers for the receiver tests: the app under a real uvicorn on loopback, emitted events."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from prefect.events import Event
from prefect.events.clients import AssertingEventsClient, EventsClient
from starlette.applications import Starlette

from falflow.emulator import RunningEmulator, WebhookDelivery
from falflow.settings import Settings, WebhookSettings
from falflow.webhooks import create_app, server_config
from falflow.webhooks.app import Receiver


class EmittedEvents:
    """Makes the receiver's events clients: Prefect's own ``AssertingEventsClient``, which keeps
    what it is sent; ``all()`` is every event any of them got."""

    def __init__(self) -> None:
        self.clients: list[AssertingEventsClient] = []

    def client(self) -> EventsClient:
        client = AssertingEventsClient()
        self.clients.append(client)
        return client

    def all(self) -> list[Event]:
        return [event for c in self.clients for event in getattr(c, "events", [])]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.all() if e.event == name]


@dataclass
class RunningReceiver:
    url: str
    app: Starlette

    @property
    def receiver(self) -> Receiver:
        found: Receiver = self.app.state.receiver
        return found

    def deliver(self, delivery: WebhookDelivery, **header_changes: str | None) -> httpx.Response:
        """POST ``delivery`` (headers changed or, with None, removed) as fal would."""
        headers = {k.lower(): v for k, v in delivery.headers.items()}
        for name, value in header_changes.items():
            key = name.lower().replace("_", "-")
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return httpx.post(self.url, content=delivery.body, headers=headers, timeout=30)

    def deliver_raw(self, body: bytes) -> httpx.Response:
        """POST ``body`` with no signature headers at all."""
        return httpx.post(self.url, content=body, timeout=30)


@contextmanager
def serve_receiver(
    settings: Settings,
    events_client: Callable[[], EventsClient],
    clock: Callable[[], float] = time.time,
) -> Iterator[RunningReceiver]:
    """The receiver app on a free loopback port in a background thread, stopped at the end."""
    app = create_app(settings, clock=clock, events_client=events_client)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        server_config(
            settings, app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the webhook receiver did not start")
        time.sleep(0.02)
    try:
        yield RunningReceiver(f"http://127.0.0.1:{port}{settings.webhooks.path}", app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def receiver_settings(emulator: RunningEmulator, **webhooks: Any) -> Settings:
    return Settings(fal=emulator.fal_settings(), webhooks=WebhookSettings(**webhooks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
