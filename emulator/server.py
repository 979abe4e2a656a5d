"""Running the emulator: in a thread (tests), in a subprocess (benchmarks: its own GIL), or in
the foreground (``python -m emulator``), and the handle clients use to reach and steer it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import select
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import BaseModel

from falflow.emulator.app import Emulator
from falflow.emulator.config import Acl, EmulatorConfig, Faults, StorageSettings
from falflow.emulator.tls import TlsFiles, make_tls_files
from falflow.emulator.webhooks import WebhookDelivery
from falflow.settings import FalSettings

HOST = "127.0.0.1"
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class RunningEmulator:
    """A started emulator: where it is, what to trust, and its ``/_emulator`` controls."""

    def __init__(
        self, *, port: int, tls: TlsFiles, api_key: str, admin_key: str, pid: int | None = None
    ) -> None:
        self.pid = pid
        """The emulator's process when it runs in its own (``start_emulator_process``)."""
        self.tls = tls
        self.port = port
        self.host = f"{HOST}:{port}"
        self.base_url = f"https://{self.host}"
        self.ca_bundle = tls.ca_bundle
        self.ca_cert = tls.ca_cert
        self.api_key = api_key
        self.admin_key = admin_key
        self._http = httpx.Client(
            base_url=self.base_url + "/_emulator",
            verify=ssl.create_default_context(cafile=str(tls.ca_cert)),
            timeout=120.0,
        )

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/rest/.well-known/jwks.json"

    def fal_settings(self) -> FalSettings:
        return FalSettings(
            queue_host=self.host,
            run_host=self.host,
            rest_url=f"{self.base_url}/rest",
            cdn_url=f"{self.base_url}/cdn",
            platform_url=f"{self.base_url}/v1",
            ca_bundle=self.ca_bundle,
            cdn_hosts=(self.host,),
        )

    def client_env(self) -> dict[str, str]:
        """Environment for a fresh process: fal_client's own variables (read at import) and
        falflow's settings. REST/CDN uploads still need ``falflow.tasks.falhosts.configure_fal_client``."""
        fal = self.fal_settings()
        return {
            "FAL_RUN_HOST": self.host,
            "FAL_QUEUE_RUN_HOST": self.host,
            "SSL_CERT_FILE": str(self.ca_bundle),
            "FAL_KEY": self.api_key,
            "FAL_ADMIN_KEY": self.admin_key,
            "FALFLOW_FAL__QUEUE_HOST": fal.queue_host,
            "FALFLOW_FAL__RUN_HOST": fal.run_host,
            "FALFLOW_FAL__REST_URL": fal.rest_url,
            "FALFLOW_FAL__CDN_URL": fal.cdn_url,
            "FALFLOW_FAL__PLATFORM_URL": fal.platform_url,
            "FALFLOW_FAL__CA_BUNDLE": str(self.ca_bundle),
            "FALFLOW_FAL__CDN_HOSTS": json.dumps(list(fal.cdn_hosts)),
        }

    def _call(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        answer = self._http.request(method, path, json=body, params=params)
        if answer.status_code >= 400:
            raise RuntimeError(
                f"emulator control {method} {path}: {answer.status_code} {answer.text}"
            )
        return answer.json()

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults (reseeding their RNG and zeroing ``injected_faults``)."""
        self._call("PUT", "faults", faults.model_dump(mode="json"))

    def injected_faults(self) -> dict[str, int]:
        """How often each fault struck since the faults were last set."""
        result: dict[str, int] = self._call("GET", "faults")["injected"]
        return result

    def configure(self, **fields: Any) -> EmulatorConfig:
        """Change config fields at runtime (e.g. ``concurrency_limit=2``); returns the result."""
        changes = {
            name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for name, value in fields.items()
        }
        config = EmulatorConfig.model_validate(self._call("PUT", "config", changes))
        self.api_key, self.admin_key = config.api_key, config.admin_key
        return config

    def current_config(self) -> EmulatorConfig:
        return EmulatorConfig.model_validate(self._call("GET", "config"))

    def inventory(self, *, hashes: bool = True) -> dict[str, Any]:
        """What the emulator still stores: ``{"now", "payloads": {request_id: {endpoint_id,
        status, input, output, stored, expires_at}}, "files": [{url, file_name, content_type,
        size, sha256, kind, request_id, created_at, expires_at, acl}]}``. ``files`` holds every
        file not deleted or expired, whatever its ACL (``acl``: ``allow``, or ``forbid``/``hide``
        for a file served only through a signed URL)."""
        result: dict[str, Any] = self._call("GET", "inventory", hashes="1" if hashes else "0")
        return result

    def storage_settings(self) -> StorageSettings:
        """The account's storage settings, as ``GET /v1/storage/settings`` answers them."""
        return StorageSettings.model_validate(self._call("GET", "storage-settings"))

    def set_storage_settings(
        self,
        *,
        expiration_duration_seconds: int | None = None,
        initial_acl: Acl | Mapping[str, Any] | None = None,
    ) -> StorageSettings:
        """Replace the account's storage settings (as ``PUT /v1/storage/settings``: what is not
        given is cleared), without a key or the rate limit; returns them as saved."""
        acl = (
            initial_acl
            if initial_acl is None or isinstance(initial_acl, Acl)
            else dict(initial_acl)
        )
        settings = StorageSettings.model_validate(
            {"expiration_duration_seconds": expiration_duration_seconds, "initial_acl": acl}
        )
        saved = self._call("PUT", "storage-settings", settings.model_dump(mode="json"))
        return StorageSettings.model_validate(saved)

    def requests(self) -> list[dict[str, Any]]:
        """Every request ever submitted (also deleted or expired ones), for assertions."""
        result: list[dict[str, Any]] = self._call("GET", "requests")
        return result

    def reset(self) -> None:
        """Start config and faults again, clock back to real time, all state dropped."""
        self._call("POST", "reset")
        config = self.current_config()
        self.api_key, self.admin_key = config.api_key, config.admin_key

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock forward (expiries, retention); running requests finish."""
        self._call("POST", "clock", {"advance_seconds": seconds})

    def webhook_attempts(self) -> list[dict[str, Any]]:
        """Every delivery attempt: ``{request_id, header_request_id, url, attempt, status_code |
        error}`` (``header_request_id``: the id in ``X-Fal-Webhook-Request-Id``)."""
        result: list[dict[str, Any]] = self._call("GET", "webhooks")
        return result

    def sign_webhook(
        self,
        request_id: str,
        body: bytes | Mapping[str, Any],
        *,
        timestamp: int | None = None,
        user_id: str | None = None,
    ) -> WebhookDelivery:
        """A delivery signed with the current key, as fal would send it (``body`` as a mapping is
        JSON-encoded; see ``emulator.webhook_body``). Tamper with it to forge one."""
        raw = body if isinstance(body, bytes) else json.dumps(dict(body)).encode()
        spec = {
            "request_id": request_id,
            "body_b64": base64.b64encode(raw).decode(),
            "timestamp": timestamp,
            "user_id": user_id,
        }
        signed = self._call("POST", "webhooks/sign", spec)
        return WebhookDelivery(base64.b64decode(signed["body_b64"]), dict(signed["headers"]))

    def rotate_webhook_key(self, *, keep_previous: bool = False) -> dict[str, Any]:
        """Sign with a new key from now on; returns the new JWKS."""
        result: dict[str, Any] = self._call(
            "POST", "webhooks/rotate", {"keep_previous": keep_previous}
        )
        return result

    def close(self) -> None:
        self._http.close()


def _bind(port: int) -> socket.socket:
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it every answer waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def _prepare(
    config: EmulatorConfig, port: int, state_dir: Path
) -> tuple[Emulator, uvicorn.Server, socket.socket, TlsFiles]:
    tls = make_tls_files(state_dir)
    sock = _bind(port)
    bound = sock.getsockname()[1]
    app = Emulator(config, base_url=f"https://{HOST}:{bound}", ca_bundle=tls.ca_bundle)
    server_config = uvicorn.Config(
        app,
        ssl_certfile=str(tls.server_cert),
        ssl_keyfile=str(tls.server_key),
        lifespan="off",
        log_config=None,  # leave the host process's logging alone
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        backlog=4096,
        server_header=False,
        date_header=False,
    )
    return app, uvicorn.Server(server_config), sock, tls


async def _serve(
    app: Emulator, server: uvicorn.Server, sock: socket.socket, ready: Callable[[], None]
) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn offers only a flag
        await asyncio.sleep(0.01)
    if server.started:
        ready()
    try:
        await serving
    finally:
        await app.aclose()


@contextmanager
def start_emulator(config: EmulatorConfig | None = None) -> Iterator[RunningEmulator]:
    """The emulator in a background thread of this process, on a free port."""
    config = config or EmulatorConfig()
    with tempfile.TemporaryDirectory(prefix="falflow-emulator-") as state_dir:
        app, server, sock, tls = _prepare(config, 0, Path(state_dir))
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(_serve(app, server, sock, started.set))
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)
                started.set()

        thread = threading.Thread(target=run, name="falflow-emulator", daemon=True)
        thread.start()
        if not started.wait(30) or failure or not server.started:
            server.should_exit = server.force_exit = True
            sock.close()
            raise RuntimeError(f"the emulator did not start: {failure or 'timed out'}")
        running = RunningEmulator(
            port=sock.getsockname()[1], tls=tls, api_key=config.api_key, admin_key=config.admin_key
        )
        try:
            yield running
        finally:
            running.close()
            # No graceful wait: idle keep-alive clients would hold a TLS close for 30 s.
            server.should_exit = server.force_exit = True
            thread.join(15)
            sock.close()


@contextmanager
def start_emulator_process(
    config: EmulatorConfig | None = None, *, startup_timeout: float = 60.0
) -> Iterator[RunningEmulator]:
    """The emulator in a child process (its own GIL), stopped when the block ends."""
    config = config or EmulatorConfig()
    with tempfile.TemporaryDirectory(prefix="falflow-emulator-") as state_dir:
        config_file = Path(state_dir) / "config.json"
        config_file.touch(mode=0o600)
        config_file.write_text(config.model_dump_json())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH")) if p
        )
        command = [sys.executable, "-m", "falflow.emulator", "--config", str(config_file)]
        command += ["--state-dir", state_dir, "--ready-json"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
        try:
            info = _read_ready_line(process, startup_timeout)
            tls = TlsFiles(**{name: Path(info[name]) for name in TlsFiles.__dataclass_fields__})
            running = RunningEmulator(
                port=int(info["port"]),
                tls=tls,
                api_key=config.api_key,
                admin_key=config.admin_key,
                pid=process.pid,
            )
            try:
                yield running
            finally:
                running.close()
        finally:
            _stop(process)
            if process.stdout is not None:
                process.stdout.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM asks uvicorn to finish; SIGINT after it makes uvicorn stop waiting for idle
    keep-alive connections; SIGKILL if even that hangs."""
    for stop in (process.terminate, lambda: process.send_signal(signal.SIGINT), process.kill):
        stop()
        try:
            process.wait(3)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _read_ready_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.2)
        if readable:
            line = process.stdout.readline()
            if line:
                info: dict[str, Any] = json.loads(line)
                return info
        if process.poll() is not None:
            raise RuntimeError(f"the emulator process exited with {process.returncode}")
    raise RuntimeError(f"the emulator process did not start within {timeout:.0f} s")


def export_lines(running: RunningEmulator) -> str:
    """Shell ``export`` lines that point fal_client and falflow at ``running``."""
    return "\n".join(
        f"export {name}={shlex.quote(value)}" for name, value in running.client_env().items()
    )


def serve(
    config: EmulatorConfig | None = None,
    port: int = 0,
    *,
    state_dir: Path | None = None,
    on_ready: Callable[[RunningEmulator], None] | None = None,
) -> None:
    """Run the emulator in the foreground until SIGINT/SIGTERM. ``on_ready`` (default: print
    the ``export`` lines to use) is called once it answers."""
    config = config or EmulatorConfig()
    _raise_file_limit()
    scratch = (
        nullcontext(str(state_dir))
        if state_dir is not None
        else tempfile.TemporaryDirectory(prefix="falflow-emulator-")
    )
    with scratch as directory:
        app, server, sock, tls = _prepare(config, port, Path(directory))
        running = RunningEmulator(
            port=sock.getsockname()[1], tls=tls, api_key=config.api_key, admin_key=config.admin_key
        )

        def ready() -> None:
            (on_ready or _print_exports)(running)

        # uvicorn shuts down gracefully, then re-raises the signal it got; make SIGTERM end up
        # like Ctrl-C, so this function returns and the CA files are removed.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            asyncio.run(_serve(app, server, sock, ready))
        except KeyboardInterrupt:
            pass  # a normal stop for a foreground server
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            running.close()
            sock.close()


def _raise_file_limit() -> None:
    """Thousands of client connections need more descriptors than a default soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_exports(running: RunningEmulator) -> None:
    print(
        f"# falflow emulator on {running.base_url} (Ctrl-C to stop). In another shell:\n"
        f"{export_lines(running)}",
        flush=True,
    )
