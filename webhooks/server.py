"""Serving the receiver: uvicorn with a deadline for every request's headers and body and a
bound on connections, so slow or stalled clients cannot hold it.

uvicorn closes idle keep-alive connections but gives a request whose line or headers trickle in
(one byte a second) all the time it wants; :class:`_HeaderDeadline` closes such a connection.
The body's deadline is the receiver's own (``webhooks.body_timeout_seconds``, answered 408),
and ``webhooks.max_connections`` is uvicorn's concurrency limit (answered 503 above it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from prefect.settings import PREFECT_API_URL
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from falflow.settings import Settings, SettingsError
from falflow.webhooks.app import create_app, logger


class _HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request line and headers are not all
    in within ``header_timeout`` seconds of the request's first byte (or of connecting)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.warning(
                "closed the connection of %s: its request headers took over %g s",
                client,
                self.header_timeout,
            )
            self.transport.close()


def server_config(
    settings: Settings, app: Starlette | None = None, **options: Any
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (default: :func:`create_app` of ``settings``);
    ``options`` go to :class:`uvicorn.Config`."""
    webhooks = settings.webhooks
    protocol = type(
        "HeaderDeadline", (_HeaderDeadline,), {"header_timeout": webhooks.header_timeout_seconds}
    )
    return uvicorn.Config(
        app or create_app(settings),
        http=protocol,
        limit_concurrency=webhooks.max_connections,
        timeout_keep_alive=5,
        **options,
    )


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the receiver until interrupted (``falflow webhooks serve``); blocks.

    Raises:
        SettingsError: no Prefect API is configured (the events would go nowhere).
    """
    if not PREFECT_API_URL.value():
        raise SettingsError(
            "PREFECT_API_URL is not set: point it at your Prefect server (or Prefect Cloud "
            "workspace) so the receiver has somewhere to send fal's events"
        )
    config = server_config(
        settings,
        host=host or settings.webhooks.host,
        port=settings.webhooks.port if port is None else port,
        log_level="info",
    )
    uvicorn.Server(config).run()
