"""Fixtures every test directory shares: one fal emulator and one Prefect test harness per session.

Tests that change the emulator's faults or configuration restore them (``emulator.reset()`` or
``emulator.set_faults(Faults())`` in a finalizer); ``reset()`` also drops its requests and files.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator
from falflow.settings import FalSettings

pytest_plugins = ["tests.support.fixtures"]

FAST = EmulatorConfig(
    latency_seconds=0.02,
    webhook_retry_seconds=0.05,
    webhook_timeout_seconds=5.0,
    stream_keepalive_seconds=0.5,
)
"""Fast model runs and webhook retries; everything else as the emulator's defaults."""


@pytest.fixture(scope="session")
def emulator() -> Iterator[RunningEmulator]:
    """The session's emulator, in a background thread of the test process."""
    with start_emulator(FAST) as running:
        yield running


@pytest.fixture(scope="session")
def fal_settings(emulator: RunningEmulator) -> FalSettings:
    """FalSettings pointing at the session's emulator (hosts, CA bundle, CDN hosts)."""
    return emulator.fal_settings()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for the session (each harness costs 20-50 s to start here).
    Its server sends no telemetry: nothing in the tests leaves loopback."""
    with (
        temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield
