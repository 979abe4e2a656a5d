"""Ways to run the emulator: a child process, ``python -m emulator``, and the environment it
hands to clients."""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process
from falflow.settings import load_settings
from tests.support.emulator import run

REPO = Path(__file__).resolve().parents[2]


def test_emulator_in_a_child_process() -> None:
    with start_emulator_process(EmulatorConfig(latency_seconds=0.01, api_key="child-key")) as fal:
        assert fal.pid is not None
        assert fal.pid != os.getpid()
        with httpx.Client(
            base_url=fal.base_url,
            verify=ssl.create_default_context(cafile=str(fal.ca_bundle)),
            headers={"Authorization": "Key child-key"},
        ) as http:
            assert run(http, "emulator/echo", {"output": {"from": "child"}}) == {"from": "child"}
        assert [r["status"] for r in fal.requests()] == ["COMPLETED"]
        base_url = fal.base_url
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base_url}/_emulator/health", verify=False, timeout=2)  # noqa: S501


def test_python_m_emulator_prints_the_exports_and_stops_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "falflow.emulator", "--latency", "0.01"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None
    try:
        exports: dict[str, str] = {}
        while "FALFLOW_FAL__CDN_HOSTS" not in exports:
            line = process.stdout.readline()
            assert line, "python -m emulator exited before printing its exports"
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").strip().partition("=")
                exports[name] = shlex.split(value)[0]
        with httpx.Client(
            base_url=f"https://{exports['FAL_QUEUE_RUN_HOST']}",
            verify=ssl.create_default_context(cafile=exports["SSL_CERT_FILE"]),
            headers={"Authorization": f"Key {exports['FAL_KEY']}"},
        ) as http:
            assert run(http, "emulator/echo", {"output": "hi"}) == "hi"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
        process.stdout.close()


def test_client_env_configures_falflow_settings(
    emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.fal == emulator.fal_settings()
    assert settings.fal_key is not None
    assert settings.fal_key.get_secret_value() == emulator.api_key
    assert settings.delete_key is not None
    assert settings.delete_key.get_secret_value() == emulator.admin_key
    assert emulator.ca_bundle.read_bytes().endswith(emulator.ca_cert.read_bytes())
