"""A byte budget: concurrent holders reserve byte counts out of a fixed total, first come first
served.

Archiving bounds the output bytes held in memory with it (each upload buffers its parts), so a
run's peak memory does not grow with file sizes or with ``limits.downloads``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio


class ByteBudget:
    """``total`` bytes shared by whoever holds a :meth:`reserve`; waiters are served in order, so a
    large reservation is not starved by a stream of small ones.

    Example:
        ```python
        budget = ByteBudget(48 * 1024**2)
        async with budget.reserve(8 * 1024**2):
            ...  # hold up to 8 MiB of data here
        ```
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a byte budget needs at least one byte, not {total}")
        self.total = total
        self.available = total
        self._waiting: deque[tuple[int, anyio.Event]] = deque()

    @asynccontextmanager
    async def reserve(self, amount: int) -> AsyncIterator[int]:
        """Hold ``amount`` bytes (at most ``total``: a bigger need takes the whole budget) for the
        block; yields the amount held."""
        amount = max(0, min(amount, self.total))
        if not self._waiting and self.available >= amount:
            self.available -= amount
        else:
            granted = anyio.Event()
            entry = (amount, granted)
            self._waiting.append(entry)
            try:
                await granted.wait()
            except BaseException:
                if granted.is_set():
                    self._release(amount)  # granted just as it was cancelled
                else:
                    self._waiting.remove(entry)
                    self._grant()  # it may have been blocking smaller ones behind it
                raise
        try:
            yield amount
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.available += amount
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.available:
            amount, granted = self._waiting.popleft()
            self.available -= amount
            granted.set()
