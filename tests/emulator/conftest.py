"""Fixtures for the emulator's own tests: each test leaves the session emulator as it found it."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx
import pytest

from falflow.emulator import RunningEmulator
from falflow.tasks.falhosts import configure_fal_client


@pytest.fixture(autouse=True)
def clean_emulator(emulator: RunningEmulator) -> Iterator[None]:
    """Every test here starts from, and leaves, a fresh emulator (config, faults, clock, state)."""
    emulator.reset()
    yield
    emulator.reset()


@pytest.fixture
def fal(emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch) -> RunningEmulator:
    """The unmodified fal_client pointed at the emulator (SSL_CERT_FILE restored afterwards)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(emulator.ca_bundle))
    configure_fal_client(emulator.fal_settings())
    return emulator


@pytest.fixture
def http(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    """Raw HTTP to the emulator, trusting only its CA; fal's key unless a test says otherwise."""
    with httpx.Client(
        base_url=emulator.base_url,
        verify=ssl.create_default_context(cafile=str(emulator.ca_cert)),
        headers={"Authorization": f"Key {emulator.api_key}"},
        timeout=30.0,
    ) as client:
        yield client
