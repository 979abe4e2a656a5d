"""ByteBudget: the total is never exceeded, waiters are served in order, cancellation gives back."""

from __future__ import annotations

import anyio
import pytest

from falflow.tasks.budget import ByteBudget

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_holders_never_exceed_the_total_and_big_ones_are_not_starved() -> None:
    budget = ByteBudget(10)
    held = 0
    most = 0
    order: list[str] = []

    async def hold(name: str, amount: int, seconds: float) -> None:
        nonlocal held, most
        async with budget.reserve(amount) as got:
            order.append(name)
            held += got
            most = max(most, held)
            await anyio.sleep(seconds)
            held -= got

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, "small-1", 4, 0.05)
        await anyio.sleep(0.01)
        tg.start_soon(hold, "big", 10, 0.01)  # must wait for small-1
        await anyio.sleep(0.01)
        for index in range(5):  # arrive after big: served after it, though they would fit now
            tg.start_soon(hold, f"later-{index}", 2, 0.01)
    assert most <= 10
    assert order[:2] == ["small-1", "big"]
    assert budget.available == 10


async def test_a_need_above_the_total_takes_the_whole_budget() -> None:
    budget = ByteBudget(8)
    async with budget.reserve(1000) as got:
        assert got == 8
        assert budget.available == 0
    assert budget.available == 8


async def test_a_cancelled_waiter_gives_way_and_keeps_nothing() -> None:
    budget = ByteBudget(10)
    served: list[str] = []

    async def wait_for(amount: int) -> None:
        async with budget.reserve(amount):
            served.append("big")

    async with budget.reserve(6):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for, 10)  # queued: only 4 bytes are free
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        with anyio.fail_after(1):  # it left the queue: a small need no longer waits behind it
            async with budget.reserve(4):
                assert budget.available == 0
    assert served == []
    assert budget.available == 10


def test_a_budget_needs_a_byte() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        ByteBudget(0)
