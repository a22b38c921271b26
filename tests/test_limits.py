"""The in-flight pixel budget: never over its total, waiters served in arrival order (small
images excepted), worker threads never blocked on it."""

import asyncio
import threading

from segserve.service.limits import SMALL_PIXELS, Lease, PixelBudget


def test_takes_fit_the_total_and_come_back():
    budget = PixelBudget(100)
    assert budget.try_take(60) and not budget.try_take(50) and budget.try_take(40)
    assert budget.used == 100
    budget.give_back(60)
    assert budget.used == 40 and budget.try_take(60)


def test_waiters_are_served_in_arrival_order_and_only_small_newcomers_pass_them():
    """A large newcomer waits behind those already waiting; a small image (a photo) takes
    what is free at once, beside a line of large ones."""
    small_limit = SMALL_PIXELS

    async def main():
        budget = PixelBudget(4 * small_limit)
        assert budget.try_take(int(3.5 * small_limit))
        order = []

        async def waiter(name, n):
            assert await budget.take(n, timeout=10)
            order.append(name)

        big = asyncio.ensure_future(waiter("big", 2 * small_limit))
        await asyncio.sleep(0)  # the big one queues first
        medium = asyncio.ensure_future(waiter("medium", int(1.2 * small_limit)))
        await asyncio.sleep(0)
        assert not budget.try_take(int(0.45 * small_limit) + small_limit)  # large: in line
        assert budget.try_take(int(0.4 * small_limit))  # small: free room, taken now
        assert not budget.try_take(int(0.2 * small_limit))  # but never past the total
        budget.give_back(int(3.5 * small_limit))
        await asyncio.gather(big, medium)
        return order, budget.used

    order, used = asyncio.run(main())
    assert order == ["big", "medium"] and used == int(3.6 * small_limit)


def test_a_waiter_gives_up_at_its_timeout_and_leaves_the_line():
    async def main():
        budget = PixelBudget(10)
        assert budget.try_take(10)
        assert not await budget.take(5, timeout=0.05)
        budget.give_back(10)
        return budget.try_take(10)

    assert asyncio.run(main())


def test_worker_threads_only_try_and_a_lease_gives_everything_back():
    budget = PixelBudget(100)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(budget.try_take(30))) for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(results) == [False, False, True, True, True] and budget.used == 90
    lease = Lease(PixelBudget(100))
    assert lease.try_take(30) and lease.try_take(50) and not lease.try_take(30)
    assert lease.held == 80
    lease.release()
    assert lease.budget.used == 0 and lease.held == 0
