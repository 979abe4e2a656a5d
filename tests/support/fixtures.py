"""Fixtures shared by the tests of tasks and flows: a moto S3 server on loopback, settings
pointing at the session's emulator with a bucket of the test's choosing, the environment a flow
reads its settings from, every log line, and emulator faults that are cleared afterwards."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from falflow.emulator import Faults, RunningEmulator
from falflow.settings import (
    BucketSettings,
    LimitSettings,
    RetentionSettings,
    Settings,
    load_settings,
)

S3_BUCKET = "falflow-test"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        # moto makes a bucket on an unsigned PUT
        httpx.put(f"{endpoint}/{S3_BUCKET}").raise_for_status()
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix in the moto bucket for each test."""
    return BucketSettings(
        url=f"s3://{S3_BUCKET}/{request.node.name[:40]}",
        endpoint=moto_endpoint,
        allow_http=True,
        region="us-east-1",
        access_key_id=SecretStr("moto-key-id"),
        secret_access_key=SecretStr("moto-secret-access-key"),
    )


@pytest.fixture
def file_bucket(tmp_path: Path) -> BucketSettings:
    return BucketSettings(url=(tmp_path / "archive").as_uri())


@pytest.fixture
def all_logs() -> Iterator[list[str]]:
    """Every log line emitted at any level while the test runs (formatted, with exceptions)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    # Prefect's run loggers do not propagate to the root logger, and stop at INFO by default;
    # falflow's propagate (a handler there too would count each line twice).
    loggers = [logging.getLogger(name) for name in ("", "prefect", "falflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.name != "falflow":
            logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture
def settings_for(emulator: RunningEmulator) -> Callable[..., Settings]:
    """Settings pointing at the emulator, with fast polling and the given bucket."""

    def make(
        bucket: BucketSettings,
        *,
        limits: dict[str, Any] | None = None,
        retention: dict[str, Any] | None = None,
    ) -> Settings:
        return load_settings(
            fal_key=emulator.api_key,
            fal_admin_key=emulator.admin_key,
            fal=emulator.fal_settings(),
            bucket=bucket,
            limits=LimitSettings(
                **{
                    "poll_interval_seconds": 0.05,
                    "max_poll_interval_seconds": 0.5,
                    **(limits or {}),
                }
            ),
            retention=RetentionSettings(**(retention or {})),
        )

    return make


@pytest.fixture
def faults(emulator: RunningEmulator) -> Iterator[Callable[..., None]]:
    """Set emulator faults for one test; they are cleared afterwards."""

    def set_faults(**probabilities: Any) -> None:
        emulator.set_faults(Faults(**probabilities))

    try:
        yield set_faults
    finally:
        emulator.set_faults(Faults())


@pytest.fixture
def archive(emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory bucket the flow archives into; the environment points falflow at both."""
    for name, value in emulator.client_env().items():
        monkeypatch.setenv(name, value)
    directory = tmp_path / "archive"
    monkeypatch.setenv("FALFLOW_BUCKET__URL", directory.as_uri())
    monkeypatch.chdir(tmp_path)  # no stray .env is read
    return directory
