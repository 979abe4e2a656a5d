"""Fixtures for the DAG tests: the environment a flow reads its
settings from, pointed at the session's emulator and a fresh local bucket."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator import RunningEmulator


@pytest.fixture
def archive(emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory bucket the flow archives into; the environment points falflow at both."""
    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    directory = tmp_path / "archive"
    monkeypatch.setenv("FALFLOW_BUCKET__URL", directory.as_uri())
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    return directory
