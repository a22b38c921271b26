"""Continuous batching: one queue and one batching task per model version.

Generic, as Ray Serve's batch queue is: it knows jobs (an item, its (H, W), a deadline, an
opaque context), not images, requests or metrics, and imports nothing from the service. It
reports what it did through one hook, `on_batch(BatchRun)`, after every run. An idle engine
runs a job at once; while a batch runs, the next gathers, and is prepared (stacked, padded)
just before the engine frees, so host work on batch k+1 overlaps inference of batch k. What
runs next is `planning.plan_next`: the oldest job's group, merged with others only when the
cost model says it pays.

Admission is all-or-nothing per request and decided at once: a request whose images do not
fit the queue, the queued-pixel budget, or (by the cost model's prediction) its deadline is
refused before anything of it is queued.

A submitter with much work (a large image's tiles) opens a `Stream` instead: admitted as a
whole when it opens, it then queues a few jobs at a time, each behind whatever arrived before
it. Work that arrives meanwhile waits for one of its runs, not for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from segserve.service.batching.planning import (
    BatchLimits,
    CostModel,
    group_pixels,
    plan_next,
    predicted_backlog,
)


class Rejected(Exception):
    """Refused before queueing; `reason` is the rejection's metric label."""

    reason = "rejected"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class QueueFull(Rejected):
    reason = "queue_full"


class Overloaded(Rejected):
    """The predicted completion is past the deadline: say so now, not at the deadline."""

    reason = "overloaded"


class ShuttingDown(Rejected):
    reason = "shutting_down"


class DeadlineExceeded(Exception):
    """The job's deadline passed while it waited."""


@dataclass(eq=False)
class Job:
    payload: Any  # what `stack` stacks (a prepared image)
    size: tuple[int, int]  # (H, W) the engine will see
    deadline: float  # on the batcher's clock
    future: asyncio.Future
    enqueued: float
    context: Any = None  # the submitter's, shared by the jobs of one submit; never read here

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@dataclass(frozen=True)
class BatchRun:
    """One run of the engine, as `on_batch` hears of it (on the event loop, or from the
    engine's thread for the jobs of a failed batch re-run one by one)."""

    jobs: list[Job]
    started: float  # on the batcher's clock: each job waited `started - job.enqueued`
    prepare_s: float  # stacking and padding it (0 for a re-run alone)
    run_s: float  # the engine's run
    pixels: int  # computed, padding included
    failed: bool = False  # the run raised (its jobs were failed or re-run alone)

    @property
    def padding(self) -> int:
        return self.pixels - sum(j.pixels for j in self.jobs)

    def contexts(self) -> list[Any]:
        """The contexts of the jobs it served, each once (a request's images share one)."""
        return list({id(j.context): j.context for j in self.jobs}.values())


@dataclass(frozen=True)
class Saturation:
    """How full a batcher is now: what an autoscaler reads (docs/operations.md)."""

    queued_images: int
    queued_pixels: int  # at inference size
    running_pixels: int  # of the batch in session.run now (padding included)
    batch_capacity_pixels: int  # the most one batch may compute
    predicted_wait_s: float  # admission's figure for a request arriving now
    oldest_wait_s: float  # how long the head of the queue has waited

    def __add__(self, other: Saturation) -> Saturation:
        """Two versions of one name (a rollout): their work adds up, the waits do not."""
        return Saturation(
            self.queued_images + other.queued_images,
            self.queued_pixels + other.queued_pixels,
            self.running_pixels + other.running_pixels,
            self.batch_capacity_pixels + other.batch_capacity_pixels,
            max(self.predicted_wait_s, other.predicted_wait_s),
            max(self.oldest_wait_s, other.oldest_wait_s),
        )


# Stacks payloads into one input; run in a thread of the batcher's own, except for a single
# payload, which must be cheap (the engine returns a view) as it runs on the event loop.
Stack = Callable[[list[Any]], Any]
RunBatch = Callable[[Any, list[tuple[int, int]]], list[Any]]
OnBatch = Callable[[BatchRun], None]


class Stream:
    """A submitter's admitted work, queued a job at a time (`submit`), each job behind what
    arrived before it. Close it when done (or given up): a stopping batcher waits for it."""

    def __init__(self, batcher: Batcher, pixels: int, deadline: float, context: Any) -> None:
        self.batcher, self.deadline, self.context = batcher, deadline, context
        self.remaining_pixels = pixels  # admitted, not yet queued
        self.closed = False

    def submit(self, payload: Any, size: tuple[int, int]) -> Job:
        if self.closed:
            raise RuntimeError("the stream is closed")
        self.remaining_pixels = max(0, self.remaining_pixels - size[0] * size[1])
        return self.batcher._queue(payload, size, self.deadline, self.context)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.batcher._close(self)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batcher:
    def __init__(
        self,
        stack: Stack,
        run_batch: RunBatch,
        limits: BatchLimits,
        cost: CostModel,
        max_queue: int = 64,
        max_queued_pixels: int = 64_000_000,
        max_queue_delay_ms: float = 0.0,
        on_batch: OnBatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack, self.run_batch = stack, run_batch
        self.limits, self.cost = limits, cost
        self.max_queue, self.max_queued_pixels = max_queue, max_queued_pixels
        self.max_delay = max_queue_delay_ms / 1000
        self.on_batch = on_batch
        self.clock = clock
        self.pending: list[Job] = []  # not yet taken into a batch
        self._next: list[Job] = []  # taken and prepared, waiting for the engine to free
        self._wake = asyncio.Event()
        self._running: asyncio.Task | None = None
        self._running_end = 0.0  # predicted, on self.clock
        self._running_pixels = 0  # computed by the batch in session.run, padding included
        self._prep_estimate = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._streams: set[Stream] = set()  # open: the loop runs until each is closed
        # One thread runs the session, one prepares the next batch beside it.
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="segserve-batch")

    # -- the public face ---------------------------------------------------------------

    @property
    def waiting(self) -> list[Job]:
        """Every job queued and not yet running, prepared or not."""
        return [*self._next, *self.pending]

    @property
    def depth(self) -> int:
        return len(self.pending) + len(self._next)

    @property
    def running(self) -> bool:
        """Whether the engine is running a batch now."""
        return self._engine_busy()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="segserve-batcher")

    async def stop(self) -> None:
        """Refuse new work, finish what is queued and running, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def predicted_wait(self, pixels: list[int], behind_streams: bool = False) -> float:
        """Seconds until `pixels` more would be done, after everything queued and running
        (and, `behind_streams`, the work open streams have yet to queue: a stream's jobs
        take turns with theirs)."""
        running_left = 0.0
        if self._running is not None and not self._running.done():
            running_left = max(0.0, self._running_end - self.clock())
        queued = [j.pixels for j in self.waiting]
        if behind_streams:
            queued += [s.remaining_pixels for s in self._streams]
        return predicted_backlog([*queued, *pixels], self.limits, self.cost, running_left)

    def saturation(self) -> Saturation:
        """How full this batcher is now (the autoscaling signal; read on the event loop)."""
        waiting, now = self.waiting, self.clock()
        return Saturation(
            queued_images=len(waiting),
            queued_pixels=sum(j.pixels for j in waiting),
            running_pixels=self._running_pixels if self.running else 0,
            batch_capacity_pixels=self.limits.max_batch_pixels,
            predicted_wait_s=self.predicted_wait([]),
            oldest_wait_s=max((now - j.enqueued for j in waiting), default=0.0),
        )

    def submit(
        self, payloads: list[tuple[Any, tuple[int, int]]], deadline: float, context: Any = None
    ) -> list[Job]:
        """Queue every (payload, (H, W)) of one submitter, or none of them (raises Rejected).
        `context` travels with each job to `on_batch` (a request's clock, say)."""
        pixels = [h * w for _, (h, w) in payloads]
        self._admit(pixels, pixels, deadline)
        return [self._queue(payload, size, deadline, context) for payload, size in payloads]

    def open_stream(
        self, pixels: list[int], deadline: float, context: Any = None, at_once: int = 1
    ) -> Stream:
        """Admit a submitter's whole work (`pixels`: each job's, in order) to be queued
        `at_once` jobs at a time through the returned stream, or raise Rejected. Its
        predicted completion counts the work of the streams already open."""
        self._admit(pixels[:at_once], pixels, deadline, behind_streams=True)
        stream = Stream(self, sum(pixels), deadline, context)
        self._streams.add(stream)
        return stream

    def check(self, pixels: list[int], deadline: float) -> None:
        """Raise Rejected unless work of `pixels` (a submitter's jobs, streamed) would be
        admitted now; nothing is queued. Lets a caller refuse before costly preparation."""
        self._admit(pixels[:1], pixels, deadline, behind_streams=True)

    def _admit(
        self, first: list[int], pixels: list[int], deadline: float, behind_streams: bool = False
    ) -> None:
        """Raise Rejected unless `first` fits the queue now and all of `pixels` is predicted
        done by `deadline`."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down", retry_after=5)
        if self.depth + len(first) > self.max_queue:
            raise QueueFull(
                f"queue full ({self.depth} of {self.max_queue} images waiting)",
                self.predicted_wait([]),
            )
        queued_pixels = sum(j.pixels for j in self.waiting)
        if queued_pixels + sum(first) > self.max_queued_pixels:
            raise QueueFull(
                f"queue full ({queued_pixels / 1e6:.1f} of {self.max_queued_pixels / 1e6:.1f} "
                "megapixels waiting)",
                self.predicted_wait([]),
            )
        now = self.clock()
        wait = self.predicted_wait(pixels, behind_streams)
        if now + wait > deadline:
            raise Overloaded(
                f"overloaded: the predicted wait of {wait:.2f} s is past the "
                f"{max(0.0, deadline - now):.2f} s left to this request",
                wait,
            )

    def _queue(self, payload: Any, size: tuple[int, int], deadline: float, context: Any) -> Job:
        future = asyncio.get_running_loop().create_future()
        job = Job(payload, size, deadline, future, self.clock(), context)
        self.pending.append(job)
        self._wake.set()
        return job

    def _close(self, stream: Stream) -> None:
        self._streams.discard(stream)
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------

    def _drop_dead(self) -> None:
        """Jobs whose requests were answered (cancelled) or whose deadline passed leave."""
        now, live = self.clock(), []
        for job in self.pending:
            if job.future.done():
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("the deadline passed while queued"))
                continue
            live.append(job)
        self.pending = live

    def _engine_busy(self) -> bool:
        return self._running is not None and not self._running.done()

    async def _gather(self) -> None:
        """Wait while waiting pays: the engine is busy (until just before it frees, less the
        time a batch takes to prepare), or an idle engine's optional companion window."""
        if self._engine_busy():
            lead = self._running_end - self.clock() - self._prep_estimate
            if lead > 0:
                await asyncio.wait({self._running}, timeout=lead)
        elif self.max_delay > 0:
            close_at = min(j.enqueued for j in self.pending) + self.max_delay
            while len(self.pending) < self.limits.max_batch_size and not self._stopping:
                left = close_at - self.clock()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead()
            if not self.pending:
                if self._stopping and not self._streams:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            self._drop_dead()
            group = plan_next(self.pending, self.limits, self.cost)
            if not group:
                continue
            taken = set(map(id, group))
            self.pending = [j for j in self.pending if id(j) not in taken]
            self._next = group
            t0 = self.clock()
            try:
                payloads = [j.payload for j in group]
                if len(group) == 1:  # a batch of one is a view: a thread hop would cost more
                    batch = self.stack(payloads)
                else:
                    batch = await loop.run_in_executor(self._executor, self.stack, payloads)
            except Exception as exc:  # a batch that cannot be formed fails its own jobs only
                self._next = []
                _fail(group, exc)
                continue
            prep = self.clock() - t0
            self._prep_estimate = 0.8 * self._prep_estimate + 0.2 * prep
            if self._running is not None:
                await asyncio.wait({self._running})
            self._next = []
            if all(j.future.done() for j in group):
                continue  # every request in it was answered meanwhile: nothing to compute
            pixels = group_pixels([j.size for j in group], self.limits.size_divisor)
            self._running_end = self.clock() + self.cost.predict(pixels)
            self._running_pixels = pixels
            self._running = loop.create_task(self._run(group, batch, prep))
        if self._running is not None:
            await asyncio.wait({self._running})

    async def _run(self, group: list[Job], batch: Any, prepare_s: float) -> None:
        start = self.clock()
        computed = group_pixels([j.size for j in group], self.limits.size_divisor)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self.run_batch, batch, [j.size for j in group]
            )
            if len(results) != len(group):  # a broken engine must not leave futures waiting
                raise RuntimeError(f"{len(results)} results for a batch of {len(group)}")
        except Exception as exc:
            self._report(BatchRun(group, start, prepare_s, self.clock() - start, computed, True))
            if len(group) == 1:
                _fail(group, exc)
            else:  # one job's input may be what fails: run each alone, fail only those
                await loop.run_in_executor(self._executor, self._run_alone, group, loop)
            return
        elapsed = self.clock() - start
        self.cost.observe(computed, elapsed)
        self._report(BatchRun(group, start, prepare_s, elapsed, computed))
        for job, result in zip(group, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _run_alone(self, group: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        """In the engine's thread: each job of a failed batch on its own."""
        for job in group:
            if job.future.done():
                continue
            start = self.clock()
            try:
                (result,) = self.run_batch(self.stack([job.payload]), [job.size])
            except Exception as exc:
                self._report(BatchRun([job], start, 0.0, self.clock() - start, job.pixels, True))
                loop.call_soon_threadsafe(_settle, job, None, exc)
                continue
            self._report(BatchRun([job], start, 0.0, self.clock() - start, job.pixels))
            loop.call_soon_threadsafe(_settle, job, result, None)

    def _report(self, run: BatchRun) -> None:
        if self.on_batch is not None:
            self.on_batch(run)


def _settle(job: Job, result: Any, exc: BaseException | None) -> None:
    if job.future.done():
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)


def _fail(jobs: list[Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
