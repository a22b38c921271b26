"""Request bodies in flight: a budget of the bytes of request bodies being received and held
at once, HTTP and gRPC together.

Each body is capped (`max_body_bytes`) and the pixels decoded at once are budgeted
(`max_inflight_pixels`), but without this a crowd of uploads is held whole in memory before
any of them is refused: 100 clients sending a 10 MB JPEG each took a server from 343 MiB to
2.7 GiB (docs/benchmarks.md, "Memory under a crowd of uploads"). So a request takes its share
of `max_inflight_body_bytes` before its body is read: the length it declares (HTTP's
Content-Length), the most a message may be while a gRPC message arrives (then its real
size), or, for a body without a declared length, each chunk as it comes. A request whose
share is not free waits for room, at most `body_wait_s` and never past half its time, then
is answered 503 with Retry-After, its body unread (HTTP closes the connection: what the
client goes on sending is never read). Shares are granted first-fit in arrival order, so a
small request passes beside a crowd of large ones waiting for room.

Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from segserve.service.errors import ServiceError

RETRY_AFTER_S = 1


class BodyBudget:
    """Bytes of request bodies being received or held, at most `total` together."""

    def __init__(self, total: int, on_change: Callable[[int], None] = lambda used: None) -> None:
        self.total, self.used = total, 0
        self.on_change = on_change
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.total

    def try_take(self, n: int) -> bool:
        """Take `n` bytes if they are free now (first fit: waiters do not block it)."""
        if not self._fits(n):
            return False
        self.used += n
        self.on_change(self.used)
        return True

    async def take(self, n: int, timeout: float) -> bool:
        """Take `n` bytes, waiting up to `timeout` s for room; False if none came."""
        if self.try_take(n):
            return True
        if n > self.total or timeout <= 0:
            return False
        granted = asyncio.get_running_loop().create_future()
        waiter = (n, granted)
        self._waiters.append(waiter)
        ok = False
        try:
            ok = await asyncio.wait_for(asyncio.shield(granted), timeout)
            return ok
        except asyncio.TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not ok and granted.done() and granted.result():
                self.give_back(n)  # granted as we timed out or were cancelled: not ours

    def give_back(self, n: int) -> None:
        """Return `n` bytes and grant waiters that now fit, in arrival order."""
        self.used -= n
        for waiter in list(self._waiters):
            size, granted = waiter
            if granted.done():
                self._waiters.remove(waiter)
            elif self._fits(size):
                self._waiters.remove(waiter)
                self.used += size
                granted.set_result(True)
        self.on_change(self.used)


class BodyLease:
    """One request's share of the body budget, given back whole when the request ends."""

    def __init__(self, budget: BodyBudget, wait_s: float) -> None:
        self.budget, self.wait_s, self.held = budget, wait_s, 0
        self.refused = False  # answered 503 for want of room: its body was never read

    async def take(self, n: int, time_left: float) -> None:
        """`n` more bytes, or ServiceError 503 (reason body_budget) when no room comes in
        time: at most `wait_s`, and never past half the request's `time_left`."""
        wait = max(0.0, min(self.wait_s, time_left / 2))
        if not await self.budget.take(n, wait):
            self.refused = True
            raise ServiceError(
                503,
                f"{n} bytes of request body do not fit beside the "
                f"{self.budget.used} bytes being received now (the budget is "
                f"{self.budget.total}): try again",
                reason="body_budget",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.held += n

    def shrink_to(self, n: int) -> None:
        """Keep only `n` of the bytes held (a message turned out smaller than reserved)."""
        if n < self.held:
            self.budget.give_back(self.held - n)
            self.held = n

    def release(self) -> None:
        if self.held:
            self.budget.give_back(self.held)
            self.held = 0
