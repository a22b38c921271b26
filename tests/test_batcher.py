"""The continuous batcher on its own: a numpy model (label = red channel over 127) stands in
for onnxruntime so that only the batcher's logic is under test. Timing-dependent behaviour
is driven by gates (events) and an injected clock, never by sleeping."""

import asyncio
import threading

import numpy as np
import pytest

from helpers import await_for
from segserve.service.batching.batcher import (
    Batcher,
    DeadlineExceeded,
    Overloaded,
    QueueFull,
    ShuttingDown,
)
from segserve.service.batching.planning import BatchLimits, CostModel


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Model:
    """stack / run_batch for the batcher, recording what it was given. A gate, when
    set up, holds each run until the test opens it."""

    def __init__(self, fail_on_width: int | None = None, gated: bool = False) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.prepared = 0
        self.fail_on_width = fail_on_width
        self.gate = threading.Event()
        self.running = threading.Event()
        if not gated:
            self.gate.set()

    def stack(self, items):
        self.prepared += 1
        h = max(i.shape[0] for i in items)
        w = max(i.shape[1] for i in items)
        out = np.zeros((len(items), h, w, 3), np.uint8)
        for k, it in enumerate(items):
            out[k, : it.shape[0], : it.shape[1]] = it
        return out

    def run_batch(self, batch, sizes):
        self.running.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_on_width is not None and any(w == self.fail_on_width for _, w in sizes):
            raise RuntimeError("this model cannot take that width")
        self.batches.append(list(sizes))
        labels = (batch[..., 0] > 127).astype(np.uint8)
        return [labels[k, :h, :w] for k, (h, w) in enumerate(sizes)]


def image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def make(model, clock=None, cost=None, **kw) -> Batcher:
    limits = BatchLimits(kw.pop("max_batch_size", 8), kw.pop("max_batch_pixels", 10**9), 16)
    extra = {"clock": clock} if clock is not None else {}
    return Batcher(
        model.stack, model.run_batch, limits, cost or CostModel(1e-9, 1e-4), **extra, **kw
    )


def submit(b: Batcher, images, deadline=1e12):
    return b.submit([(im, im.shape[:2]) for im in images], deadline)


async def wait_until(event: threading.Event) -> None:
    await asyncio.wait_for(asyncio.to_thread(event.wait, 10), 10)


def test_a_lone_request_runs_at_once_without_any_window():
    clock = FakeClock()  # frozen: any wait on the batcher's clock would show as queue time
    model = Model()
    runs = []

    async def main():
        b = make(model, clock, on_batch=runs.append)
        b.start()
        (job,) = submit(b, [image(32, 48)])
        labels = await job.future
        await b.stop()
        return job, labels

    job, labels = asyncio.run(main())
    assert runs[0].started - job.enqueued == 0.0 and model.batches == [[(32, 48)]]
    assert np.array_equal(labels, image(32, 48)[..., 0] > 127)


def test_requests_arriving_while_the_engine_runs_form_the_next_batch():
    model = Model(gated=True)

    async def main():
        b = make(model)
        b.start()
        first = submit(b, [image(16, 16, 0)])
        await wait_until(model.running)  # batch 1 is in session.run
        later = [submit(b, [image(16, 16, s)])[0] for s in (1, 2, 3)]
        model.gate.set()
        await asyncio.gather(*(j.future for j in first + later))
        await b.stop()

    asyncio.run(main())
    assert [len(b) for b in model.batches] == [1, 3]


def test_the_next_batch_is_prepared_while_the_current_one_runs():
    model = Model(gated=True)

    async def main():
        b = make(model)
        b.start()
        first = submit(b, [image(16, 16)])
        await wait_until(model.running)
        second = submit(b, [image(16, 16, 1)])
        await await_for(lambda: model.prepared == 2, 10, "the batcher stacking batch 2")
        prepared_during_run = model.prepared == 2 and not first[0].future.done()
        model.gate.set()
        await asyncio.gather(first[0].future, second[0].future)
        await b.stop()
        return prepared_during_run

    assert asyncio.run(main())


def test_batches_keep_to_max_batch_size_and_every_label_is_cropped_back():
    model = Model(gated=True)
    images = [image(20 + i, 30 - i, seed=i) for i in range(7)]

    async def main():
        b = make(model, max_batch_size=3)
        b.start()
        blocker = submit(b, [image(8, 8)])
        await wait_until(model.running)
        jobs = [submit(b, [im])[0] for im in images]
        model.gate.set()
        labels = await asyncio.gather(*(j.future for j in blocker + jobs))
        await b.stop()
        return labels[1:]

    labels = asyncio.run(main())
    assert max(len(b) for b in model.batches) == 3
    for im, lab in zip(images, labels, strict=True):
        assert np.array_equal(lab, im[..., 0] > 127)


def test_admission_refuses_at_once_when_the_predicted_wait_passes_the_deadline():
    clock = FakeClock()
    cost = CostModel(per_pixel=1e-3, fixed=0.0)  # 1 ms per pixel

    async def main():
        b = make(Model(), clock, cost)  # not started: the queue only fills
        submit(b, [image(10, 10)], deadline=clock.now + 1)  # 0.1 s predicted: admitted
        with pytest.raises(Overloaded) as refused:
            submit(b, [image(30, 30)], deadline=clock.now + 0.5)  # 0.1 + 0.9 s > 0.5 s
        assert refused.value.retry_after == 1 and b.depth == 1
        submit(b, [image(30, 30)], deadline=clock.now + 1.5)  # 1.0 s fits

    asyncio.run(main())


def test_a_request_is_admitted_whole_or_not_at_all():
    async def main():
        b = make(Model(), max_queue=4)
        submit(b, [image(8, 8)] * 3)
        with pytest.raises(QueueFull):
            submit(b, [image(8, 8)] * 2)  # 3 + 2 > 4: none of the two is queued
        assert b.depth == 3
        b2 = make(Model(), max_queued_pixels=250)
        submit(b2, [image(10, 10)] * 2)
        with pytest.raises(QueueFull, match="megapixels"):
            submit(b2, [image(10, 10)] * 2)
        assert b2.depth == 2

    asyncio.run(main())


def test_answered_and_expired_jobs_never_reach_the_model():
    clock = FakeClock()
    model = Model()

    async def main():
        b = make(model, clock)
        expired = submit(b, [image(16, 16)], deadline=clock.now + 1)
        gone = submit(b, [image(16, 16)] * 3, deadline=clock.now + 5)
        for job in gone:
            job.future.cancel()  # the request was answered (client gone, 503, ...)
        clock.now += 2
        live = submit(b, [image(16, 16)], deadline=clock.now + 5)
        b.start()
        result = await live[0].future
        with pytest.raises(DeadlineExceeded):
            await expired[0].future
        await b.stop()
        return result

    assert asyncio.run(main()).shape == (16, 16)
    assert model.batches == [[(16, 16)]]


def test_one_failing_input_fails_alone_and_its_batch_companions_get_their_labels():
    model = Model(fail_on_width=13, gated=True)

    async def main():
        b = make(model)
        b.start()
        blocker = submit(b, [image(8, 8)])
        await wait_until(model.running)
        good = [submit(b, [image(16, 16, s)])[0] for s in range(3)]
        bad = submit(b, [image(16, 13)])[0]
        model.gate.set()
        await blocker[0].future
        labels = await asyncio.gather(*(j.future for j in good))
        with pytest.raises(RuntimeError, match="cannot take that width"):
            await bad.future
        after = await submit(b, [image(16, 16)])[0].future  # and the batcher goes on
        await b.stop()
        return labels, after

    labels, after = asyncio.run(main())
    # The failed batch of four was run again one by one; the bad one never completed.
    assert model.batches == [[(8, 8)], [(16, 16)], [(16, 16)], [(16, 16)], [(16, 16)]]
    for s, lab in enumerate(labels):
        assert np.array_equal(lab, image(16, 16, s)[..., 0] > 127)
    assert after.shape == (16, 16)


def test_stop_finishes_what_is_queued_and_then_refuses():
    model = Model()

    async def main():
        b = make(model, max_batch_size=2)
        jobs = [submit(b, [image(16, 16)])[0] for _ in range(5)]
        b.start()
        await b.stop()
        with pytest.raises(ShuttingDown):
            submit(b, [image(16, 16)])
        return [j.future.done() and j.future.exception() is None for j in jobs]

    assert all(asyncio.run(main()))


def test_an_engine_that_returns_too_few_results_fails_the_batch_at_once():
    """A run whose results do not match its batch (a broken engine) fails every job of it
    then and there: none is left waiting for its deadline."""
    model = Model()
    real_run = model.run_batch
    model.run_batch = lambda batch, sizes: real_run(batch, sizes)[:-1]

    async def main():
        b = make(model, max_batch_size=1)
        b.start()
        (job,) = submit(b, [image(16, 16)], deadline=1e12)
        with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
            await asyncio.wait_for(job.future, 5)
        await b.stop()

    asyncio.run(main())


def test_a_run_reports_its_jobs_waits_and_each_submitters_context_once():
    """Two images of one submitter in one batch: the hook hears of one run serving one
    context (not one per image), and of each job's wait behind the blocker."""
    clock = FakeClock()
    model = Model(gated=True)
    runs = []

    async def main():
        b = make(model, clock, on_batch=runs.append)
        b.start()
        (blocker,) = submit(b, [image(8, 8)])
        await wait_until(model.running)
        context = object()
        jobs = b.submit([(image(32, 32), (32, 32)), (image(32, 32, 1), (32, 32))], 1e12, context)
        clock.now += 2.0  # both wait two seconds behind the blocker
        model.gate.set()
        await asyncio.gather(blocker.future, *(j.future for j in jobs))
        await b.stop()
        return context, jobs

    context, jobs = asyncio.run(main())
    assert model.batches[1] == [(32, 32), (32, 32)]
    second = runs[1]
    assert second.jobs == jobs and second.contexts() == [context]
    assert [second.started - j.enqueued for j in jobs] == [2.0, 2.0]
    assert second.run_s == 0.0 and not second.failed  # the frozen clock: no time passed
    assert (second.pixels, second.padding) == (2 * 32 * 32, 0)


def test_saturation_says_what_waits_what_runs_and_how_much_padding_ran():
    clock = FakeClock()
    model = Model(gated=True)
    batches = []

    async def main():
        b = make(model, clock, on_batch=batches.append)
        b.start()
        idle = b.saturation()
        (running,) = submit(b, [image(32, 32)])
        await wait_until(model.running)
        waiting = submit(b, [image(20, 30), image(32, 48)])
        clock.now += 3.0
        busy = b.saturation()
        model.gate.set()
        await asyncio.gather(running.future, *(j.future for j in waiting))
        await b.stop()
        return idle, busy, b.saturation()

    idle, busy, after = asyncio.run(main())
    assert (idle.queued_images, idle.running_pixels, idle.predicted_wait_s) == (0, 0, 0.0)
    assert busy.queued_images == 2 and busy.queued_pixels == 20 * 30 + 32 * 48
    assert busy.running_pixels == 32 * 32 and busy.oldest_wait_s == 3.0
    assert busy.predicted_wait_s > 0 and busy.batch_capacity_pixels == 10**9
    assert (after.queued_images, after.running_pixels) == (0, 0)
    # The second run merged 20x30 with 32x48 (cheap pixels, dear runs): both padded to 32x48.
    merged = batches[1]
    assert (len(merged.jobs), merged.pixels) == (2, 2 * 32 * 48)
    assert merged.padding == 2 * 32 * 48 - (20 * 30 + 32 * 48)


def test_a_stream_queues_a_job_at_a_time_and_later_work_runs_between_its_jobs():
    model = Model(gated=True)
    order = []

    async def main():
        b = make(model, max_batch_size=1)
        b.start()
        stream = b.open_stream([16 * 16] * 3, 1e12)
        first = stream.submit(image(16, 16), (16, 16))
        await wait_until(model.running)
        (other,) = submit(b, [image(8, 8)])  # arrives while the stream's first job runs
        model.gate.set()
        await first.future
        second = stream.submit(image(16, 16, 1), (16, 16))  # queued after `other`
        await asyncio.gather(other.future, second.future)
        third = stream.submit(image(16, 16, 2), (16, 16))
        await third.future
        stream.close()
        await b.stop()
        order.extend(model.batches)

    asyncio.run(main())
    assert order == [[(16, 16)], [(8, 8)], [(16, 16)], [(16, 16)]]


def test_a_stopping_batcher_finishes_an_open_stream_first():
    model = Model()

    async def main():
        b = make(model)
        b.start()
        stream = b.open_stream([64, 64], 1e12)
        await stream.submit(image(8, 8), (8, 8)).future
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0)  # the stop has begun: new submitters are refused ...
        with pytest.raises(ShuttingDown):
            submit(b, [image(8, 8)])
        job = stream.submit(image(8, 8, 1), (8, 8))  # ... the open stream is not
        labels = await job.future
        stream.close()
        await stopping
        return labels

    assert asyncio.run(main()).shape == (8, 8)


def test_a_stream_is_admitted_on_all_its_work_and_counts_the_open_streams_before_it():
    clock = FakeClock()
    cost = CostModel(per_pixel=1e-3, fixed=0.0)  # 1 ms a pixel: 1000 px take a second

    async def main():
        b = make(Model(), clock, cost)
        with pytest.raises(Overloaded):
            b.open_stream([1000] * 5, clock.now + 4.0)  # five seconds of work, four left
        first = b.open_stream([1000] * 3, clock.now + 4.0)  # three seconds: admitted
        with pytest.raises(Overloaded):  # behind the first stream's three seconds
            b.open_stream([1000] * 2, clock.now + 4.0)
        assert b.predicted_wait([]) == 0.0  # a single request still waits for nothing
        first.close()
        b.open_stream([1000] * 2, clock.now + 4.0).close()

    asyncio.run(main())
