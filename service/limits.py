"""The pixels being worked on at once, across all requests: a bound on the memory requests
hold (decoded pixels, labels, encoders' buffers), whatever sizes they declare.

Decoding runs in worker threads, which must never block waiting for budget (the requests
holding it need those threads to finish): a thread only *tries* to take budget, and a
request that gets none waits on the event loop, in arrival order, then tries again.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class PixelBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = deque()

    def try_take(self, n: int) -> bool:
        """Take `n` if free and nobody waits before us (any thread)."""
        with self._lock:
            if self._waiters or self.used + n > self.total:
                return False
            self.used += n
            return True

    def give_back(self, n: int) -> None:
        """Return `n` and wake the first waiter (any thread)."""
        with self._lock:
            self.used -= n
            first = self._waiters[0] if self._waiters else None
        if first is not None:
            first[0].call_soon_threadsafe(first[1].set)

    async def take(self, n: int, timeout: float) -> bool:
        """Wait, in arrival order, until `n` is free and take it; False after `timeout` s."""
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        deadline = loop.time() + max(0.0, timeout)
        with self._lock:
            self._waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    if self._waiters[0] is waiter and self.used + n <= self.total:
                        self.used += n
                        return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(waiter[1].wait(), left)
                except asyncio.TimeoutError:
                    return False
                waiter[1].clear()
        finally:
            with self._lock:
                self._waiters.remove(waiter)
                first = self._waiters[0] if self._waiters else None
            if first is not None:  # the next in line may fit now
                first[0].call_soon_threadsafe(first[1].set)


class Lease:
    """One request's share of the budget, given back whole when the request ends."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget, self.held = budget, 0

    def try_take(self, n: int) -> bool:
        if self.budget.try_take(n):
            self.held += n
            return True
        return False

    async def take(self, n: int, timeout: float) -> bool:
        if await self.budget.take(n, timeout):
            self.held += n
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.budget.give_back(self.held)
            self.held = 0
