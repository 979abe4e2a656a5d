"""Emulator capacity: open 1,000 requests, then hammer their status from this process.

The emulator runs in its own process (``start_emulator_process``) so the client does not share
its GIL. Two clients hammer it, one after the other:

- httpx AsyncClients with keep-alive and several hundred concurrent callers, spread over clients
  of 20 connections each (one httpx pool with hundreds of connections spends most of its CPU
  managing the pool). httpx needs 2-4 ms of CPU per call, so on 2 cores this rate is bounded by
  the client, not the emulator.
- a minimal keep-alive HTTP/1.1-over-TLS client (asyncio streams, ~0.2 ms per call): what the
  emulator itself can answer.

For each it reports calls/s and the emulator's CPU per status call (its capacity is 1 / that).
Prints the figures; asserts nothing about time.

    python -m bench.emulator_capacity [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.harness import process_cpu_seconds
from falflow.emulator import EmulatorConfig, RunningEmulator, start_emulator_process

ENDPOINT = "fal-ai/flux/schnell"
CONNECTIONS_PER_CLIENT = 20
Call = Callable[[str], Awaitable[int]]
"""One status call on a caller's own connection: the path in, the status code out."""


async def _hammer(
    emu: RunningEmulator, callers: list[Call], paths: list[str], calls: int
) -> dict[str, Any]:
    """``calls`` status calls spread over ``callers`` (each warmed up first)."""
    cycle = itertools.cycle(paths)
    codes: Counter[int] = Counter()
    errors = 0

    async def drive(call: Call, share: int) -> None:
        nonlocal errors
        for _ in range(share):
            try:
                codes[await call(next(cycle))] += 1
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError):
                errors += 1

    await asyncio.gather(*(drive(call, 2) for call in callers))  # TLS handshakes, untimed
    codes.clear()
    count = len(callers)
    shares = [calls // count + (i < calls % count) for i in range(count)]
    emulator_before, client_before = process_cpu_seconds(emu.pid), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(drive(call, share) for call, share in zip(callers, shares, strict=True)))
    seconds = time.perf_counter() - started
    emulator_after, client_after = process_cpu_seconds(emu.pid), time.process_time()
    emulator_ms = (
        None
        if emulator_before is None or emulator_after is None
        else 1000 * (emulator_after - emulator_before) / calls
    )
    return {
        "calls": calls,
        "concurrency": count,
        "seconds": round(seconds, 3),
        "calls_per_second": round(calls / seconds, 1),
        "status_codes": {str(code): n for code, n in sorted(codes.items())},
        "transport_errors": errors,
        "client_cpu_ms_per_call": round(1000 * (client_after - client_before) / calls, 3),
        "emulator_cpu_ms_per_call": None if emulator_ms is None else round(emulator_ms, 3),
        "emulator_calls_per_cpu_second": None if not emulator_ms else round(1000 / emulator_ms),
    }


def _httpx_callers(
    emu: RunningEmulator, verify: ssl.SSLContext, concurrency: int
) -> tuple[list[httpx.AsyncClient], list[Call]]:
    limits = httpx.Limits(
        max_connections=CONNECTIONS_PER_CLIENT, max_keepalive_connections=CONNECTIONS_PER_CLIENT
    )
    clients = [
        httpx.AsyncClient(
            base_url=emu.base_url,
            verify=verify,
            headers={"Authorization": f"Key {emu.api_key}"},
            limits=limits,
            timeout=60.0,
        )
        for _ in range(max(1, concurrency // CONNECTIONS_PER_CLIENT))
    ]

    def caller(client: httpx.AsyncClient) -> Call:
        async def call(path: str) -> int:
            return (await client.get(path, params={"logs": "false"})).status_code

        return call

    return clients, [caller(clients[i % len(clients)]) for i in range(concurrency)]


class _RawCaller:
    """Keep-alive HTTP/1.1 on one TLS connection, opened on first use; no parsing beyond the
    status line and Content-Length."""

    def __init__(self, emu: RunningEmulator, verify: ssl.SSLContext) -> None:
        self._emu = emu
        self._verify = verify
        self._head = f"Host: {emu.host}\r\nAuthorization: Key {emu.api_key}\r\n\r\n"
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, path: str) -> int:
        if self._stream is None:
            self._stream = await asyncio.open_connection(
                "127.0.0.1", self._emu.port, ssl=self._verify
            )
        reader, writer = self._stream
        writer.write(f"GET {path}?logs=false HTTP/1.1\r\n{self._head}".encode())
        header = await reader.readuntil(b"\r\n\r\n")
        length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return int(header[9:12])

    async def aclose(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            await self._stream[1].wait_closed()


async def _drive(
    emu: RunningEmulator, open_requests: int, calls: int, concurrency: int
) -> dict[str, Any]:
    verify = ssl.create_default_context(cafile=str(emu.ca_bundle))
    clients, httpx_callers = _httpx_callers(emu, verify, concurrency)
    try:
        started = time.perf_counter()

        async def submit(index: int) -> str:
            answer = await clients[index % len(clients)].post(
                f"/{ENDPOINT}", json={"prompt": f"capacity {index}"}
            )
            answer.raise_for_status()
            request_id: str = answer.json()["request_id"]
            return request_id

        ids = await asyncio.gather(*(submit(i) for i in range(open_requests)))
        submits_per_second = open_requests / (time.perf_counter() - started)
        paths = [f"/fal-ai/flux/requests/{rid}/status" for rid in ids]
        with_httpx = await _hammer(emu, httpx_callers, paths, calls)
    finally:
        for client in clients:
            await client.aclose()
    raw_callers = [_RawCaller(emu, verify) for _ in range(concurrency)]
    try:
        with_raw_client = await _hammer(emu, list(raw_callers), paths, calls)
    finally:
        for caller in raw_callers:
            await caller.aclose()
    return {
        "submits_per_second": round(submits_per_second, 1),
        "httpx": with_httpx,
        "raw_client": with_raw_client,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Figures for 1,000 open requests (half running, half queued under a concurrency limit)."""
    open_requests = 1000
    calls = 3_000 if quick else 10_000
    concurrency = 200 if quick else 400
    config = EmulatorConfig(latency_seconds=3600.0, concurrency_limit=open_requests // 2)
    with start_emulator_process(config) as emu:
        figures = asyncio.run(_drive(emu, open_requests, calls, concurrency))
        held = [r for r in emu.requests() if r["status"] != "COMPLETED"]
    return {
        "open_requests": open_requests,
        "open_requests_held": len(held),
        "queued": sum(1 for r in held if r["status"] == "IN_QUEUE"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer status calls")
    figures = run(quick=parser.parse_args().quick)
    print(json.dumps(figures, indent=2))
    print(f"{figures['open_requests_held']} open requests held ({figures['queued']} queued)")
    for name in ("httpx", "raw_client"):
        part = figures[name]
        print(
            f"{name}: {part['calls_per_second']:,.0f} status calls/s, {part['concurrency']} "
            f"concurrent, {part['transport_errors']} transport errors; emulator "
            f"{part['emulator_cpu_ms_per_call']} ms CPU per call "
            f"(= {part['emulator_calls_per_cpu_second']} calls per CPU-second), client "
            f"{part['client_cpu_ms_per_call']} ms"
        )


if __name__ == "__main__":
    main()
