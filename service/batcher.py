"""Dynamic batching: one asyncio queue and one batching task per model version.

A batch closes at `max_batch_size` requests or `max_queue_delay_ms` after its first one.
Requests are grouped by padded shape (H, W rounded up to the model's size divisor); near
shapes share a batch while the padding they add stays under `max_padding_fraction` of the
batch's pixels. Each group is one `session.run` in a worker thread, so the event loop never
blocks; results are cropped back to each request's own H x W.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from segserve.service.imaging import padded_size, preprocess


class QueueFull(Exception):
    """The model's queue is at its bound: answer 503 at once."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could run: 504."""


class ShuttingDown(Exception):
    """The batcher stopped before the request ran: 503."""


@dataclass
class Job:
    image: np.ndarray  # H x W x 3 uint8 RGB
    deadline: float  # time.monotonic()
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def group_by_shape(jobs: list[Job], divisor: int, max_padding_fraction: float) -> list[list[Job]]:
    """Greedy grouping: largest padded shape first; a job joins a group when the group's
    shape covers it and the padding it adds keeps the group under the waste bound."""
    order = sorted(
        jobs,
        key=lambda j: padded_size(*j.shape, divisor)[0] * padded_size(*j.shape, divisor)[1],
        reverse=True,
    )
    groups: list[tuple[tuple[int, int], list[Job], int]] = []  # (shape, jobs, useful pixels)
    for job in order:
        ph, pw = padded_size(*job.shape, divisor)
        for i, (shape, members, useful) in enumerate(groups):
            if ph <= shape[0] and pw <= shape[1]:
                total = shape[0] * shape[1] * (len(members) + 1)
                if 1 - (useful + ph * pw) / total <= max_padding_fraction:
                    members.append(job)
                    groups[i] = (shape, members, useful + ph * pw)
                    break
        else:
            groups.append(((ph, pw), [job], ph * pw))
    return [members for _, members, _ in groups]


class Batcher:
    """Owns one model's queue; `submit` returns the labels of one image (H x W uint8)."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        mean,
        std,
        input_dtype,
        size_divisor: int,
        max_batch_size: int = 8,
        max_queue_delay_ms: float = 5.0,
        max_queue: int = 64,
        max_padding_fraction: float = 0.25,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.mean, self.std, self.input_dtype = mean, std, input_dtype
        self.size_divisor = size_divisor
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
        self.max_padding_fraction = max_padding_fraction
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="segserve-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._stopping = True
        if self._task is not None:
            await self.queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, image: np.ndarray, deadline: float) -> Job:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        job = Job(image=image, deadline=deadline, future=asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"queue full ({self.queue.maxsize} requests waiting)") from None
        return job

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        close_at = time.monotonic() + self.max_delay
        while len(jobs) < self.max_batch_size:
            timeout = close_at - time.monotonic()
            if timeout <= 0:
                # Take what is already waiting without waiting any longer.
                while len(jobs) < self.max_batch_size and not self.queue.empty():
                    jobs.append(self.queue.get_nowait())
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _loop(self) -> None:
        while True:
            jobs = await self._collect()
            try:
                await self._run(jobs)
            finally:
                for _ in jobs:
                    self.queue.task_done()

    async def _run(self, jobs: list[Job]) -> None:
        now_mono, now = time.monotonic(), time.perf_counter()
        live = []
        for job in jobs:
            job.timings["queue"] = now - job.enqueued
            if job.future.done():  # the client went away (cancelled) before inference
                continue
            if now_mono > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(job)
        for group in group_by_shape(live, self.size_divisor, self.max_padding_fraction):
            await self._run_group(group)

    async def _run_group(self, group: list[Job]) -> None:
        padded = [padded_size(*j.shape, self.size_divisor) for j in group]
        shape = (max(h for h, _ in padded), max(w for _, w in padded))

        def work() -> tuple[np.ndarray, float, float]:
            t0 = time.perf_counter()
            batch = preprocess(
                [j.image for j in group], self.mean, self.std, self.input_dtype, size=shape
            )
            t1 = time.perf_counter()
            labels = self.run_batch(batch)
            return labels, t1 - t0, time.perf_counter() - t1

        try:
            labels, pre_s, infer_s = await asyncio.to_thread(work)
        except Exception as exc:  # a failing model must fail its requests, not the batcher
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(group))
        for job, lab in zip(group, labels, strict=True):
            if job.future.done():
                continue
            job.timings.update(preprocess=pre_s, inference=infer_s)
            h, w = job.shape
            job.future.set_result(np.ascontiguousarray(lab[:h, :w]))
