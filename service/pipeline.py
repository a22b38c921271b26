"""The request pipeline: the steps of every request (decode, segment, labels back at the
image's size, render), over the models the registry serves. The front ends (web/, protocols/)
are thin on top of it; it can be driven in-process without any of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from segserve.service.batching.batcher import DeadlineExceeded, Rejected
from segserve.service.errors import NOT_READY, ServiceError
from segserve.service.limits import Lease, PixelBudget, RequestLimits
from segserve.service.media.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedFormat,
    decode_opened,
    fit_size,
    open_image,
    resize_rgb,
)
from segserve.service.media.render import RenderSpec, render, resize_labels
from segserve.service.runtime.memory import give_back_memory
from segserve.service.runtime.registry import ModelRegistry, ServedModel
from segserve.service.settings import Settings
from segserve.service.telemetry.clock import Stage, Timings
from segserve.service.telemetry.prometheus import ServiceMetrics

log = logging.getLogger("segserve")
T = TypeVar("T")


@dataclass(eq=False)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8, at inference size
    prepared: np.ndarray  # as the model takes it (engine.prepare)
    size: tuple[int, int]  # (H, W) of the image itself: the labels come back at this size

    @property
    def inference_size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def scaled(self) -> bool:
        return self.inference_size != self.size


class InferenceService:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.budget = PixelBudget(settings.max_inflight_pixels)
        self.limits = RequestLimits(
            settings.max_images_per_request,
            settings.max_image_pixels,
            settings.max_request_pixels,
        )

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """A request's share of the in-flight pixel budget, given back when it ends."""
        lease = Lease(self.budget)
        try:
            yield lease
        finally:
            lease.release()

    # -- 1. bytes or pixels in ---------------------------------------------------------

    async def decode(
        self, blobs: list[bytes], model: ServedModel, timings: Timings, lease: Lease
    ) -> list[DecodedImage]:
        """Encoded images (one request's) to the model's input: one worker hop, two when the
        request had to wait for pixel budget."""
        try:
            return await asyncio.to_thread(self._decode_sync, blobs, model, timings, lease)
        except _NoBudget as short:
            await self._take(lease, short.pixels, timings)
        return await asyncio.to_thread(self._decode_sync, blobs, model, timings, lease)

    def _decode_sync(
        self, blobs: list[bytes], model: ServedModel, timings: Timings, lease: Lease
    ) -> list[DecodedImage]:
        """Decode in one worker thread. Headers first: the request's pixels must fit its
        limits and the budget before any pixel is decoded; when the budget has no room now,
        _NoBudget says how much is missing (the caller waits for it on the event loop, not
        in this thread, and calls again)."""
        s = self.settings
        try:
            with timings.stage(Stage.DECODE):
                opened = [open_image(b, s.max_image_pixels, s.formats) for b in blobs]
                self.limits.check_pixels([(p.height, p.width) for _, p in opened])
                pixels = sum(probe.pixels for _, probe in opened)
                if lease.held < pixels and not lease.try_take(pixels - lease.held):
                    raise _NoBudget(pixels - lease.held)
                decoded = [
                    (decode_opened(im, probe, s.max_inference_pixels, s.formats), probe)
                    for im, probe in opened
                ]
        except ImageTooLarge as exc:
            raise ServiceError(413, str(exc), reason="too_many_pixels") from exc
        except UnsupportedFormat as exc:
            raise ServiceError(415, str(exc), reason="media_type") from exc
        except ImageDecodeError as exc:
            raise ServiceError(400, str(exc), reason="bad_image") from exc
        return [self._prepare(rgb, (p.height, p.width), model, timings) for rgb, p in decoded]

    async def from_pixels(
        self, arrays: np.ndarray, model: ServedModel, timings: Timings, lease: Lease
    ) -> list[DecodedImage]:
        """Raw RGB pixels (N x H x W x 3 uint8, one request's) to the model's input."""
        n, h, w = arrays.shape[:3]
        self.limits.check_pixels([(h, w)] * n)
        await self._take(lease, n * h * w, timings)
        fit_h, fit_w = fit_size((h, w), self.settings.max_inference_pixels)
        return await asyncio.to_thread(
            lambda: [
                self._prepare(resize_rgb(a, fit_h, fit_w), (h, w), model, timings) for a in arrays
            ]
        )

    def _prepare(
        self, rgb: np.ndarray, size: tuple[int, int], model: ServedModel, timings: Timings
    ) -> DecodedImage:
        with timings.stage(Stage.PREPROCESS):
            prepared = model.engine.prepare(rgb)
        self.metrics.image_pixels.observe(size[0] * size[1])
        return DecodedImage(rgb, prepared, size)

    async def _take(self, lease: Lease, pixels: int, timings: Timings) -> None:
        if not await lease.take(pixels, timings.left()):
            raise ServiceError(
                503,
                "busy with other large images: no room for this one's pixels before its deadline",
                reason="pixel_budget",
                headers={"Retry-After": "1"},
            )

    # -- 2. the model ------------------------------------------------------------------

    async def segment(
        self,
        model: ServedModel,
        images: list[DecodedImage],
        timings: Timings,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> list[np.ndarray]:
        """Labels (at inference size) for every image of one request, through the model's
        batcher: admitted as a whole or refused at once; given up as a whole (the rest of
        its work dropped) when the deadline passes or the client leaves."""
        if not model.warmed:
            raise ServiceError(
                503,
                "the model is not ready",
                reason="not_ready",
                code=NOT_READY,
                headers={"Retry-After": "1"},
            )
        try:
            jobs = model.batcher.submit(
                [(im.prepared, im.inference_size) for im in images], timings.deadline, timings
            )  # the request's clock rides with its jobs: the batcher's hook writes into it
        except Rejected as exc:
            raise ServiceError(
                503, str(exc), reason=exc.reason, headers={"Retry-After": str(exc.retry_after)}
            ) from exc
        everything = asyncio.gather(*(j.future for j in jobs))
        waiters: set[asyncio.Future] = {everything}
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if gone is not None:
            waiters.add(gone)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timings.left(), return_when="FIRST_COMPLETED"
            )
        finally:
            if gone is not None:
                gone.cancel()
        if everything not in done or everything.exception() is not None:
            for job in jobs:
                job.future.cancel()  # the batcher drops every job of this request not yet run
            everything.add_done_callback(_consume)
        if everything not in done:
            if gone is not None and gone in done:
                raise ServiceError(499, "client closed the connection", reason="client_gone")
            raise self._deadline_error()
        if (exc := everything.exception()) is not None:
            if isinstance(exc, DeadlineExceeded):
                raise self._deadline_error() from exc
            log.error("%s v%s failed on an input: %s", model.name, model.version, exc)
            raise ServiceError(
                500, f"the model failed on this input: {type(exc).__name__}: {exc}"
            ) from exc
        return everything.result()

    def _deadline_error(self) -> ServiceError:
        return ServiceError(
            504,
            f"no result within the {self.settings.request_timeout_s} s deadline",
            reason="deadline",
        )

    # -- 3. the answer -----------------------------------------------------------------

    async def render(
        self,
        model: ServedModel,
        image: DecodedImage,
        labels: np.ndarray,
        spec: RenderSpec,
        timings: Timings,
    ) -> tuple[bytes, str]:
        """The answer in the asked format, at the image's own size, in one worker hop."""

        def work() -> tuple[bytes, str]:
            (full,) = _at_image_size([image], [labels], timings)
            h, w = image.size
            rgb = resize_rgb(image.rgb, h, w) if spec.format == "overlay" else image.rgb
            header: dict = {"model": model.name, "version": model.version}
            if image.scaled:
                header["inference_size"] = [image.inference_size[1], image.inference_size[0]]
            out = render(rgb, full, model.card, spec, header, timings)
            del full, rgb
            give_back_memory(h * w)  # the decode and render buffers of a large image
            return out

        return await asyncio.to_thread(work)

    async def encode_labels(
        self,
        images: list[DecodedImage],
        labels: list[np.ndarray],
        encode: Callable[[list[np.ndarray]], T],
        timings: Timings,
    ) -> T:
        """A protocol's answer (`encode`: labels at the images' own size -> the answer), in
        one worker hop."""

        def work() -> T:
            full = _at_image_size(images, labels, timings)
            with timings.stage(Stage.ENCODE):
                out = encode(full)
            del full
            give_back_memory(sum(h * w for h, w in (im.size for im in images)))
            return out

        return await asyncio.to_thread(work)


class _NoBudget(Exception):
    """The in-flight budget lacks `pixels` for this request now."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.pixels = pixels


def _at_image_size(
    images: list[DecodedImage], labels: list[np.ndarray], timings: Timings
) -> list[np.ndarray]:
    with timings.stage(Stage.POSTPROCESS):
        return [resize_labels(lab, *im.size) for im, lab in zip(images, labels, strict=True)]


def _consume(future: asyncio.Future) -> None:
    """Mark a given-up future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
