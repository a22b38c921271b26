"""How much a request may hold: its images and pixels (413 beyond, checked before any pixel
is decoded) and, across all requests, the pixels being worked on at once.

The budget bounds the memory requests hold (decoded pixels, labels, encoders' buffers),
whatever sizes they declare. Decoding runs in worker threads, which must never block
waiting for budget (the requests holding it need those threads to finish): a thread only
*tries* to take budget, and a request that gets none waits on the event loop, in arrival
order, then tries again. A small image (at most SMALL_PIXELS) is not made to wait behind
large ones that wait for room: it takes what is free (measured: behind a crowd of 16 MP
uploads a 256x256 image waited 2.8 s in line; docs/benchmarks.md, "Memory under a crowd of
uploads"), which delays a large one by a small one's run at most.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from segserve.service.errors import ServiceError


@dataclass(frozen=True)
class RequestLimits:
    """Images per request, pixels per image and per request: the 413s, in one place."""

    max_images: int
    max_image_pixels: int
    max_request_pixels: int

    def check_count(self, count: int) -> None:
        if count > self.max_images:
            raise ServiceError(
                413,
                f"{count} images in one request; the limit is {self.max_images}",
                reason="too_many_images",
            )

    def check_pixels(self, sizes: Sequence[tuple[int, int]]) -> None:
        """`sizes`: (H, W) of each image of one request."""
        self.check_count(len(sizes))
        for h, w in sizes:
            if h * w > self.max_image_pixels:
                raise ServiceError(
                    413,
                    f"image is {w}x{h} = {w * h} pixels; the limit is {self.max_image_pixels}",
                    reason="too_many_pixels",
                )
        total = sum(h * w for h, w in sizes)
        if total > self.max_request_pixels:
            raise ServiceError(
                413,
                f"the request's images have {total} pixels together; the limit is "
                f"{self.max_request_pixels}",
                reason="too_many_pixels",
            )


SMALL_PIXELS = 1_000_000  # a photo: passes large requests waiting for room


class PixelBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = deque()

    def try_take(self, n: int) -> bool:
        """Take `n` if free and nobody waits before us, or `n` is small (any thread)."""
        with self._lock:
            if (self._waiters and n > SMALL_PIXELS) or self.used + n > self.total:
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
