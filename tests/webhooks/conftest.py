"""Fixtures for the webhook receiver tests (the emulator fixture comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from falflow.emulator import RunningEmulator
from tests.support.receiver import EmittedEvents, RunningReceiver, receiver_settings, serve_receiver


@pytest.fixture
def events() -> EmittedEvents:
    """The events the receiver sends, kept by Prefect's own asserting events client."""
    return EmittedEvents()


@pytest.fixture
def receiver(emulator: RunningEmulator, events: EmittedEvents) -> Iterator[RunningReceiver]:
    """The receiver with default settings, trusting the emulator's JWKS."""
    with serve_receiver(receiver_settings(emulator), events.client) as running:
        yield running
