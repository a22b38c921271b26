"""The inference service driven in-process, without HTTP: the steps of a request (decode,
segment, labels back at the image's size, render) over real onnxruntime sessions, with the
request limits, the pixel budget and the stage timings they keep."""

import asyncio
import io
import json
from functools import partial

import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes
from segserve.service.errors import ServiceError
from segserve.service.media.render import RenderSpec
from segserve.service.pipeline import InferenceService
from segserve.service.protocols.open_inference import InferRequest, infer_response
from segserve.service.settings import Settings
from segserve.service.telemetry.clock import Stage, Timings


def service(repository, **settings) -> InferenceService:
    values = {"warmup_shapes": "32x32", "intra_op_threads": 1, "repository_poll_s": 0}
    return InferenceService(Settings(repository=repository, **{**values, **settings}))


def serve(repository, steps, **settings):
    """Run `steps(svc)` (a coroutine function) between the service's start and stop."""

    async def main():
        svc = service(repository, **settings)
        await svc.registry.start()
        try:
            return await steps(svc)
        finally:
            await svc.registry.stop()

    return asyncio.run(main())


def test_a_request_runs_decode_segment_and_render_and_times_each_stage(tiny_repository):
    data = image_bytes(40, 56)

    async def steps(svc):
        model, timings = svc.registry.get(None), Timings(30)
        async with svc.lease() as lease:
            (image,) = await svc.decode([data], model, timings, lease)
            (labels,) = await svc.segment(model, [image], timings)
            body, media = await svc.render(model, image, labels, RenderSpec("png"), timings)
        (direct,) = model.engine.segment([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])
        return body, media, direct, timings, svc.budget.used

    body, media, direct, timings, budget_left = serve(tiny_repository, steps)
    assert media == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), direct)
    assert list(timings.seconds) == list(Stage)  # every stage, each measured in its step
    assert budget_left == 0  # the lease gave its pixels back


def test_pixels_asked_to_fit_run_scaled_down_and_come_back_at_their_own_size(tiny_repository):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 60, 80, 3), dtype=np.uint8)
    request = InferRequest.model_validate(
        {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 60, 80, 3], "data": [0]}]}
    )

    async def steps(svc):
        model, timings = svc.registry.get(None), Timings(30)
        async with svc.lease() as lease:
            plan = svc.scale_plan(model, "fit")
            images = await svc.from_pixels(pixels, model, timings, lease, plan)
            labels = await svc.segment(model, images, timings)
            answer = await svc.encode_labels(
                images,
                labels,
                partial(infer_response, model.name, model.version, request),
                timings,
            )
        return images, labels, answer, timings

    images, labels, (body, media, _), timings = serve(tiny_repository, steps, fit_pixels=1200)
    assert [im.scaled for im in images] == [True, True] and labels[0].shape == (30, 40)
    assert images[0].inference() == {"policy": "fit", "height": 30, "width": 40, "tiles": 1}
    out = json.loads(body)["outputs"][0]
    assert media == "application/json" and out["shape"] == [2, 60, 80]
    assert {Stage.POSTPROCESS, Stage.ENCODE} <= set(timings.seconds)


@pytest.mark.parametrize(
    "blobs, status, reason",
    [
        ([b"not an image"], 400, "bad image"),
        ([image_bytes(10, 10, "GIF")], 415, "GIF"),
        ([image_bytes(100, 100)], 413, "limit"),
        ([image_bytes(60, 60), image_bytes(60, 60, seed=1)], 413, "together"),
    ],
)
def test_what_cannot_be_served_is_refused_before_any_pixel_is_decoded(
    tiny_repository, blobs, status, reason
):
    async def steps(svc):
        async with svc.lease() as lease:
            await svc.decode(blobs, svc.registry.get(None), Timings(30), lease)

    with pytest.raises(ServiceError) as caught:
        serve(
            tiny_repository,
            steps,
            image_formats="png",
            max_image_pixels=5000,
            max_request_pixels=5000,
            max_inflight_pixels=5000,
        )
    assert caught.value.status == status
    assert reason.lower() in caught.value.detail.lower() or reason == "bad image"


def test_a_request_waits_for_pixel_budget_and_gets_503_at_its_deadline(tiny_repository):
    async def steps(svc):
        model = svc.registry.get(None)
        async with svc.lease() as holder:
            assert holder.try_take(svc.budget.total)  # another request holds it all
            async with svc.lease() as lease:
                with pytest.raises(ServiceError) as caught:
                    await svc.decode([image_bytes(20, 20)], model, Timings(0.2), lease)
        async with svc.lease() as lease:  # once given back, the same request goes through
            (image,) = await svc.decode([image_bytes(20, 20)], model, Timings(30), lease)
        return caught.value, image

    refused, image = serve(tiny_repository, steps, max_inflight_pixels=40_000_000)
    assert refused.status == 503 and refused.reason == "pixel_budget"
    assert image.size == (20, 20)


def test_large_work_the_model_would_refuse_is_refused_before_it_is_decoded(tiny_repository):
    """A 16 MP image whose tiles the batcher predicts past a 1 s deadline: 503 (overloaded)
    while only its header was read; its pixels never taken from the budget, never decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (90, 120, 30)).save(buf, "PNG")  # small file, 16 MP

    async def steps(svc):
        model, timings = svc.registry.get(None), Timings(1.0)
        decoded = []
        real = svc._prepare
        svc._prepare = lambda *a: decoded.append(a) or real(*a)
        async with svc.lease() as lease:
            with pytest.raises(ServiceError) as refused:
                await svc.decode([buf.getvalue()], model, timings, lease)
            held = lease.held
        return refused.value, decoded, held, timings

    error, decoded, held, timings = serve(
        tiny_repository, steps, timeout_s_per_megapixel=0, tile_size=320
    )
    assert error.status == 503 and error.reason == "overloaded", error.detail
    assert decoded == [] and held == 0
    assert timings.seconds[Stage.DECODE] < 0.5  # the header, not 16 MP of pixels
