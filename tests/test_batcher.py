"""The dynamic batcher on its own: grouping, batching, bounds, deadlines, failures.

The model here is a plain numpy function (label = pixel's red channel above the mean), a
real computation standing in for onnxruntime so the batcher's logic is tested alone."""

import asyncio
import time

import numpy as np
import pytest

from segserve.service.batcher import Batcher, DeadlineExceeded, Job, QueueFull, group_by_shape


def threshold_model(batch: np.ndarray) -> np.ndarray:
    return (batch[:, 0] > 0).astype(np.uint8)


def make_batcher(run=threshold_model, **kw) -> Batcher:
    sizes = []
    b = Batcher(run, [0.5] * 3, [0.25] * 3, np.float32, 16, on_batch=sizes.append, **kw)
    b.sizes = sizes
    return b


def image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def job(h, w):
    return Job(image=np.zeros((h, w, 3), np.uint8), deadline=0, future=None)


def test_same_padded_shapes_share_a_group_and_far_shapes_do_not():
    jobs = [job(500, 500), job(510, 505), job(100, 100)]
    groups = group_by_shape(jobs, 16, 0.25)
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1, 2]  # with the 100x100 image, 32 % of the batch would be padding
    assert len(group_by_shape(jobs, 16, 0.4)) == 1


def test_padding_bound_is_respected():
    jobs = [job(512, 512), job(400, 512), job(300, 512)]
    for bound in (0.0, 0.1, 0.25, 0.5):
        for group in group_by_shape(jobs, 16, bound):
            hs = [-(-j.shape[0] // 16) * 16 for j in group]
            ws = [-(-j.shape[1] // 16) * 16 for j in group]
            total = max(hs) * max(ws) * len(group)
            assert 1 - sum(h * w for h, w in zip(hs, ws, strict=True)) / total <= bound + 1e-9


async def run_many(batcher, images, timeout=5.0):
    jobs = [batcher.submit(im, time.monotonic() + timeout) for im in images]
    return await asyncio.gather(*(j.future for j in jobs))


def test_concurrent_requests_are_batched_and_cropped_back():
    async def main():
        b = make_batcher(max_batch_size=8, max_queue_delay_ms=20)
        b.start()
        images = [image(60 + i, 70 - i, seed=i) for i in range(6)] + [image(33, 47, seed=9)]
        labels = await run_many(b, images)
        await b.stop()
        return b, images, labels

    b, images, labels = asyncio.run(main())
    assert max(b.sizes) > 1
    for im, lab in zip(images, labels, strict=True):
        assert lab.shape == im.shape[:2]
        alone = threshold_model(
            ((im.transpose(2, 0, 1)[None] / 255 - 0.5) / 0.25).astype(np.float32)
        )[0]
        assert np.array_equal(lab, alone)


def test_batches_never_exceed_max_batch_size():
    async def main():
        b = make_batcher(max_batch_size=3, max_queue_delay_ms=50)
        b.start()
        await run_many(b, [image(32, 32)] * 10)
        await b.stop()
        return b.sizes

    sizes = asyncio.run(main())
    assert max(sizes) <= 3 and sum(sizes) == 10


def test_full_queue_refuses_at_once():
    async def main():
        b = make_batcher(max_queue=2)  # not started: nothing drains the queue
        b.submit(image(8, 8), time.monotonic() + 1)
        b.submit(image(8, 8), time.monotonic() + 1)
        with pytest.raises(QueueFull):
            b.submit(image(8, 8), time.monotonic() + 1)

    asyncio.run(main())


def test_expired_and_cancelled_jobs_never_reach_the_model():
    seen = []

    def counting_model(batch):
        seen.append(batch.shape[0])
        return threshold_model(batch)

    async def main():
        b = make_batcher(run=counting_model, max_queue_delay_ms=1)
        expired = b.submit(image(16, 16), time.monotonic() - 1)
        gone = b.submit(image(16, 16), time.monotonic() + 5)
        gone.future.cancel()  # the client went away
        live = b.submit(image(16, 16), time.monotonic() + 5)
        b.start()
        result = await live.future
        with pytest.raises(DeadlineExceeded):
            await expired.future
        await b.stop()
        return result

    assert asyncio.run(main()).shape == (16, 16)
    assert seen == [1]


def test_a_failing_model_fails_its_batch_and_the_batcher_goes_on():
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return threshold_model(batch)

    async def main():
        b = make_batcher(run=flaky, max_queue_delay_ms=1)
        b.start()
        first = b.submit(image(16, 16), time.monotonic() + 5)
        with pytest.raises(RuntimeError, match="boom"):
            await first.future
        second = await run_many(b, [image(16, 16)])
        await b.stop()
        return second

    assert asyncio.run(main())[0].shape == (16, 16)


def test_stop_finishes_what_is_queued():
    async def main():
        b = make_batcher(max_batch_size=2, max_queue_delay_ms=1)
        jobs = [b.submit(image(16, 16), time.monotonic() + 5) for _ in range(5)]
        b.start()
        await b.stop()
        return [j.future.done() and not j.future.cancelled() for j in jobs]

    assert all(asyncio.run(main()))
