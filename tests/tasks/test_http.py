"""The sharded transport against the emulator's real HTTPS server: requests spread over its
pools, each pool's slot is given back however the response ends, and the bound holds."""

from __future__ import annotations

import ssl

import anyio
import httpx
import pytest

from falflow.emulator import RunningEmulator
from falflow.tasks.http import ShardedTransport, from_ingress

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(emulator: RunningEmulator, transport: ShardedTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url=emulator.base_url)


def _transport(
    emulator: RunningEmulator, max_connections: int, shard_size: int
) -> ShardedTransport:
    verify = ssl.create_default_context(cafile=str(emulator.fal_settings().ca_bundle))
    return ShardedTransport(max_connections=max_connections, verify=verify, shard_size=shard_size)


async def test_concurrent_requests_spread_over_pools_and_release_them(
    emulator: RunningEmulator,
) -> None:
    transport = _transport(emulator, max_connections=12, shard_size=4)
    assert transport.in_use == (0, 0, 0)
    snapshots: list[tuple[int, ...]] = []
    holding: set[int] = set()
    most_held = 0
    async with _client(emulator, transport) as client:

        async def one() -> None:
            nonlocal most_held
            async with client.stream("GET", "/rest/.well-known/jwks.json") as response:
                connection = id(response.extensions["network_stream"])
                holding.add(connection)
                most_held = max(most_held, len(holding))
                snapshots.append(transport.in_use)
                await anyio.sleep(0.05)  # hold the connection while the others queue
                assert "keys" in (await response.aread()).decode()
                holding.discard(connection)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
        assert transport.in_use == (0, 0, 0)
    assert 4 <= most_held <= 12  # several pools at work, never more than the bound together
    assert min(max(snapshots, key=sum)) >= 1, "one pool took every request"


async def test_slots_come_back_after_early_close_errors_and_cancellation(
    emulator: RunningEmulator,
) -> None:
    transport = _transport(emulator, max_connections=4, shard_size=2)
    async with _client(emulator, transport) as client:

        async def abandon_half_read() -> None:
            async with client.stream("GET", "/rest/.well-known/jwks.json") as response:
                async for _ in response.aiter_raw(1):
                    raise RuntimeError("stop reading")

        with pytest.raises(RuntimeError):
            await abandon_half_read()
        with anyio.move_on_after(0.01):  # cancelled whatever it was doing
            for _ in range(1000):
                await client.get("/rest/.well-known/jwks.json")
        assert transport.in_use == (0, 0)

    refused = _transport(emulator, max_connections=2, shard_size=2)
    async with httpx.AsyncClient(transport=refused) as client:
        with pytest.raises(httpx.ConnectError):  # nothing listens there
            await client.get("https://127.0.0.1:9/")
    assert refused.in_use == (0,)


@pytest.mark.parametrize(
    ("status", "headers", "body", "ingress"),
    [
        (503, {}, "<html><center>nginx</center></html>", True),
        (502, {}, "<hr><center>nginx</center>", True),
        (503, {"x-fal-request-id": "r1"}, "<center>nginx</center>", False),  # fal answered
        (503, {}, '{"detail": "model overloaded"}', False),  # no proxy page: the model's own
        (500, {}, "nginx", False),  # a 500 is never the proxy's
    ],
)
def test_only_a_proxy_page_without_a_request_id_is_an_ingress_error(
    status: int, headers: dict[str, str], body: str, ingress: bool
) -> None:
    response = httpx.Response(status, headers=headers, text=body)
    assert from_ingress(response) is ingress
