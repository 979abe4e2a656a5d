"""PostgreSQL and Redis on loopback, each in its own process: the database and the message broker
of a Prefect server under production load (``bench scale`` and ``tests/e2e/test_e2e_scale.py``).

Both come from Debian packages (``apt-get install postgresql redis-server``; ``.ci/run`` installs
them). PostgreSQL refuses to run as root, so as root its cluster belongs to the ``postgres``
user (``runuser``). Neither keeps anything: a throwaway directory, no fsync, no snapshots.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BenchError, free_port

PG_ROOT = Path("/usr/lib/postgresql")


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), if any."""
    found = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def missing_packages() -> list[str]:
    """What is missing of PostgreSQL and Redis (empty: both are installed)."""
    missing = []
    if postgres_bin() is None:
        missing.append("postgresql")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    return missing


@dataclass(frozen=True)
class Databases:
    """A running PostgreSQL and Redis, and the Prefect settings that use them."""

    postgres_url: str
    redis_port: int
    postgres_pid: int
    redis_pid: int

    def prefect_env(self) -> dict[str, str]:
        """A Prefect server on PostgreSQL with Redis messaging, cache, causal ordering and lease
        storage: what ``prefect server start --workers N`` (N > 1) requires."""
        return {
            "PREFECT_API_DATABASE_CONNECTION_URL": self.postgres_url,
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(self.redis_port),
        }


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{what} did not start (rc={proc.poll()}):\n{tail}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # PostgreSQL: smart shutdown; Redis: exits at once
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def databases() -> Iterator[Databases]:
    """PostgreSQL (database ``prefect``) and Redis on free loopback ports, stopped and removed
    at the end.

    Raises:
        BenchError: one is not installed (naming the packages) or did not start (with its log).
    """
    missing = missing_packages()
    if missing:
        raise BenchError(
            f"not installed: {', '.join(missing)} (apt-get install -y postgresql redis-server)"
        )
    bindir = postgres_bin()
    assert bindir is not None
    base = Path(tempfile.mkdtemp(prefix="falflow-databases-"))
    base.chmod(0o755)  # the postgres user reaches its data directory through it
    data, pg_log, redis_log = base / "pg", base / "postgres.log", base / "redis.log"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                          "--auth=trust", "--encoding=UTF8", "--no-sync"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        pg_port, redis_port = free_port(), free_port()
        with pg_log.open("wb") as out:
            postgres = subprocess.Popen(
                _as_postgres([
                    str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                    "-p", str(pg_port), "-k", str(data), "-c", "max_connections=200",
                    # throwaway data: durability only costs the 2 cores time
                    "-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                ]),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(postgres)
        with redis_log.open("wb") as out:
            redis = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
                 "--save", "", "--appendonly", "no", "--dir", str(base)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(redis)
        psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres"]

        def accepting() -> bool:
            done = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg_port)],
                capture_output=True, check=False,
            )  # fmt: skip
            return done.returncode == 0

        _wait("PostgreSQL", accepting, postgres, pg_log)
        subprocess.run([*psql, "-c", "CREATE DATABASE prefect"], check=True, capture_output=True)
        _wait("Redis", lambda: _pings(redis_port), redis, redis_log)
        yield Databases(
            postgres_url=f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/prefect",
            redis_port=redis_port,
            postgres_pid=postgres.pid,
            redis_pid=redis.pid,
        )
    finally:
        for proc in reversed(procs):
            _stop(proc)
        with suppress(OSError):
            shutil.rmtree(base)
