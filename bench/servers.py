"""Servers the benchmarks start on loopback, each in its own process: moto (S3) and Prefect."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx

from bench.harness import REPO, BenchError, free_port

BIN = Path(sys.executable).parent
# moto accepts any key pair; these only have to agree between the two sides.
S3_REGION, S3_KEY_ID, S3_SECRET = "us-east-1", "bench", "bench-secret"


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
    argv: list[str], *, env: dict[str, str], health_url: str, what: str, timeout: float
) -> Iterator[_Started]:
    """Run ``argv`` until the block ends (started, not yet waited for)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield _Started(proc, health_url, what, timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
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
