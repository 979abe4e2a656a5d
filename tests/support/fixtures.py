"""Fixtures shared by the tests of tasks and flows: storage servers on loopback (moto and
SeaweedFS for S3, Azurite, fake-gcs-server) with a bucket per test, settings pointing at the
session's emulator with a bucket of the test's choosing, the environment a flow reads its settings
from, every log line, and emulator faults that are cleared afterwards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from bench.servers import (
    AZURITE,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    S3_KEY_ID,
    S3_REGION,
    S3_SECRET,
    AzureServer,
    GCSServer,
    S3Server,
    azurite,
    fake_gcs,
    seaweedfs_s3,
)
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


@pytest.fixture(scope="session")
def checksum_refusing_s3(moto_endpoint: str) -> Iterator[str]:
    """An S3 endpoint that answers 400 to every request carrying an S3 additional checksum, as
    S3-compatible stores without them do, and passes every other request to the moto server."""
    forward = httpx.Client(base_url=moto_endpoint, timeout=30)
    refusal = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
        b"<Message>x-amz-checksum headers are not supported</Message></Error>"
    )
    hop_by_hop = {"host", "connection", "content-length", "transfer-encoding"}

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            if any(name.lower().startswith("x-amz-checksum") for name in self.headers):
                status, headers, content = 400, {"content-type": "application/xml"}, refusal
            else:
                sent = {k: v for k, v in self.headers.items() if k.lower() not in hop_by_hop}
                answer = forward.request(self.command, self.path, headers=sent, content=body)
                status, content = answer.status_code, answer.content
                headers = {k: v for k, v in answer.headers.items() if k.lower() not in hop_by_hop}
                headers.pop("content-encoding", None)  # httpx decoded it
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(content)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        forward.close()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[S3Server]:
    with seaweedfs_s3(S3_BUCKET) as server:
        yield server


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[AzureServer]:
    """Azurite, installed by ``make test``; missing, it fails the test in CI (``CI`` set) and is
    skipped only outside CI."""
    if not AZURITE.exists() and not os.environ.get("CI"):
        pytest.skip("Azurite is not installed: `make azurite` (npm); CI fails here instead")
    with azurite(S3_BUCKET) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    with fake_gcs(S3_BUCKET) as server:
        yield server


def _prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own: its name, cut short, and a hash of its full id."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return f"{request.node.name[:40].strip('[]-_')}-{digest}"


@pytest.fixture
def s3_bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix in the moto bucket for each test."""
    return BucketSettings(
        url=f"s3://{S3_BUCKET}/{_prefix(request)}",
        endpoint=moto_endpoint,
        allow_http=True,
        region="us-east-1",
        access_key_id=SecretStr("moto-key-id"),
        secret_access_key=SecretStr("moto-secret-access-key"),
    )


@pytest.fixture
def seaweedfs_bucket(seaweedfs: S3Server, request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix in the SeaweedFS bucket for each test (signatures checked)."""
    return BucketSettings(
        url=seaweedfs.bucket_url(_prefix(request)),
        endpoint=seaweedfs.endpoint,
        allow_http=True,
        region=S3_REGION,
        access_key_id=SecretStr(S3_KEY_ID),
        secret_access_key=SecretStr(S3_SECRET),
    )


@pytest.fixture
def azure_bucket(azurite_server: AzureServer, request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix in the Azurite container for each test."""
    return BucketSettings(
        url=azurite_server.bucket_url(_prefix(request)),
        endpoint=azurite_server.endpoint,
        allow_http=True,
        azure_account_name=AZURITE_ACCOUNT,
        azure_account_key=SecretStr(AZURITE_KEY),
    )


@pytest.fixture
def gcs_bucket(gcs_server: GCSServer, request: pytest.FixtureRequest) -> BucketSettings:
    """A fresh prefix in the fake-gcs-server bucket for each test, with a service-account key
    of its own: obstore signs with it locally and never asks the cloud metadata address."""
    return BucketSettings(
        url=f"gs://{gcs_server.bucket}/{_prefix(request)}",
        endpoint=gcs_server.endpoint,
        allow_http=True,
        gcs_service_account_key=SecretStr(json.dumps(service_account_key())),
    )


def service_account_key() -> dict[str, str]:
    """A made-up GCS service-account key (a fresh RSA key; the email names no real account)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "client_email": "falflow@example.iam.gserviceaccount.com",
        "private_key_id": "k1",
        "private_key": pem,
    }


BUCKETS = {
    "file": "file_bucket",
    "moto": "s3_bucket",
    "seaweedfs": "seaweedfs_bucket",
    "azurite": "azure_bucket",
}
"""Every bucket kind falflow writes to in the tests, by name, and the fixture that makes one."""


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
