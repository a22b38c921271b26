"""The request pipeline: the steps of every request (decode, segment, labels back at the
image's size, render), over the models the registry serves. The front ends (web/, protocols/)
are thin on top of it; it can be driven in-process without any of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from segserve.service.batching.batcher import DeadlineExceeded, Rejected
from segserve.service.errors import NOT_READY, ServiceError
from segserve.service.intake import BodyBudget, BodyLease
from segserve.service.limits import SMALL_PIXELS, Lease, PixelBudget, RequestLimits
from segserve.service.media.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedFormat,
    decode_opened,
    open_image,
    resize_rgb,
)
from segserve.service.media.render import RenderSpec, render, resize_labels
from segserve.service.media.tiling import (
    ScalePlan,
    Tile,
    TileGrid,
    keep_centre,
    tile_pixels,
)
from segserve.service.runtime.memory import give_back_memory
from segserve.service.runtime.registry import ModelRegistry, ServedModel
from segserve.service.settings import Settings
from segserve.service.shadow import Shadow
from segserve.service.telemetry.clock import Stage, Timings
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.telemetry.tracing import Tracing

log = logging.getLogger("segserve")
T = TypeVar("T")


@dataclass(eq=False)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8 at inference size (native: the image's own)
    size: tuple[int, int]  # (H, W) of the image itself: the labels come back at this size
    plan: ScalePlan
    grid: TileGrid | None = None  # its tiles, when it runs in tiles
    prepared: np.ndarray | None = None  # the whole image as the model takes it (no tiles)

    @property
    def inference_size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def scaled(self) -> bool:
        return self.inference_size != self.size

    @property
    def tiles(self) -> int:
        return self.grid.count if self.grid is not None else 1

    def inference(self) -> dict:
        """What was done to the image, for the answer: the policy, the size the network saw
        it at, and the tiles (1: whole), their side and halo."""
        h, w = self.inference_size
        out: dict = {"policy": self.plan.policy, "height": h, "width": w, "tiles": self.tiles}
        if self.grid is not None:
            out.update(tile=self.grid.tile, halo=self.grid.halo)
        return out

    def headers(self) -> dict[str, str]:
        """The same as HTTP headers (X-Inference-Size is WxH, as image sizes are written)."""
        h, w = self.inference_size
        return {
            "X-Scale": self.plan.policy,
            "X-Inference-Size": f"{w}x{h}",
            "X-Tiles": str(self.tiles),
        }


class InferenceService:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.tracing = tracing or Tracing()
        self.registry = ModelRegistry(settings, self.metrics, self.tracing)
        self.budget = PixelBudget(settings.max_inflight_pixels)
        # Request bodies being received or held, HTTP and gRPC together (service/intake.py).
        self.bodies = BodyBudget(
            settings.max_inflight_body_bytes, self.metrics.inflight_body_bytes.set
        )
        self.metrics.body_budget_bytes.set(settings.max_inflight_body_bytes)
        self.shadow = Shadow(settings, self.registry, self.budget, self.metrics)
        self.limits = RequestLimits(
            settings.max_images_per_request,
            settings.max_image_pixels,
            settings.max_request_pixels,
        )

    def body_lease(self) -> BodyLease:
        """A request's share of the body budget (the caller releases it when it ends)."""
        return BodyLease(self.bodies, self.settings.body_wait_s)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """A request's share of the in-flight pixel budget, given back when it ends."""
        lease = Lease(self.budget)
        try:
            yield lease
        finally:
            lease.release()

    def scale_plan(self, model: ServedModel, policy: str | None = None) -> ScalePlan:
        """How this model meets a request's images: the policy asked for (default: the
        card's), the working size of fit, and the tile and halo of native on this server."""
        s, engine = self.settings, model.engine
        # A whole run may be as large as a CPU batch may be (under the arena's shrink size):
        # a 1024x768 photo runs whole, not in two tiles.
        whole = engine.batch_pixel_limit or 0
        try:
            return ScalePlan.for_card(
                model.card, policy, s.tile_size_for(engine.provider), s.fit_pixels, whole
            )
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from exc

    # -- 1. bytes or pixels in ---------------------------------------------------------

    async def decode(
        self,
        blobs: list[bytes],
        model: ServedModel,
        timings: Timings,
        lease: Lease,
        plan: ScalePlan | None = None,
    ) -> list[DecodedImage]:
        """Encoded images (one request's) to the model's input: one worker hop, two when the
        request had to wait for pixel budget."""
        plan = plan or self.scale_plan(model)
        checked = False
        while True:
            try:
                return await asyncio.to_thread(
                    self._decode_sync, blobs, model, timings, lease, plan, checked
                )
            except _CheckFirst as large:  # would the model take it? Before it is decoded.
                self._check_admission(model, large.sizes, plan, timings)
                checked = True
            except _NoBudget as short:
                await self._take(lease, short.pixels, timings)

    def _decode_sync(
        self,
        blobs: list[bytes],
        model: ServedModel,
        timings: Timings,
        lease: Lease,
        plan: ScalePlan,
        checked: bool = False,
    ) -> list[DecodedImage]:
        """Decode in one worker thread. Headers first: the request's pixels must fit its
        limits and the budget before any pixel is decoded; when the budget has no room now,
        _NoBudget says how much is missing (the caller waits for it on the event loop, not
        in this thread, and calls again). Work larger than a small image goes back to the
        event loop first (_CheckFirst) to ask the batcher whether it would be admitted: a
        request refused anyway is refused before its decode's CPU is spent. Native images
        decode at their own size, fit ones straight to their working size."""
        s = self.settings
        fit = plan.fit_pixels if plan.policy == "fit" else None
        try:
            with timings.stage(Stage.DECODE):
                opened = [open_image(b, s.max_image_pixels, s.formats) for b in blobs]
                sizes = [(p.height, p.width) for _, p in opened]
                self.limits.check_pixels(sizes)
                pixels = sum(h * w for h, w in sizes)
                if not checked and sum(_work(sizes, plan)) > SMALL_PIXELS:
                    raise _CheckFirst(sizes)
                if lease.held < pixels and not lease.try_take(pixels - lease.held):
                    raise _NoBudget(pixels - lease.held)
                timings.extend(self._extra_time(sizes, plan))
                decoded = [decode_opened(im, probe, fit, s.formats) for im, probe in opened]
        except ImageTooLarge as exc:
            raise ServiceError(413, str(exc), reason="too_many_pixels") from exc
        except UnsupportedFormat as exc:
            raise ServiceError(415, str(exc), reason="media_type") from exc
        except ImageDecodeError as exc:
            raise ServiceError(400, str(exc), reason="bad_image") from exc
        return [
            self._prepare(rgb, size, model, plan, timings)
            for rgb, size in zip(decoded, sizes, strict=True)
        ]

    async def from_pixels(
        self,
        arrays: np.ndarray,
        model: ServedModel,
        timings: Timings,
        lease: Lease,
        plan: ScalePlan | None = None,
    ) -> list[DecodedImage]:
        """Raw RGB pixels (N x H x W x 3 uint8, one request's) to the model's input."""
        plan = plan or self.scale_plan(model)
        n, h, w = arrays.shape[:3]
        sizes = [(h, w)] * n
        self.limits.check_pixels(sizes)
        self._check_admission(model, sizes, plan, timings)  # before its pixels are prepared
        await self._take(lease, n * h * w, timings)
        timings.extend(self._extra_time(sizes, plan))
        fit_h, fit_w = plan.inference_size((h, w))
        return await asyncio.to_thread(
            lambda: [
                self._prepare(resize_rgb(a, fit_h, fit_w), (h, w), model, plan, timings)
                for a in arrays
            ]
        )

    def _check_admission(
        self, model: ServedModel, sizes: list[tuple[int, int]], plan: ScalePlan, timings: Timings
    ) -> None:
        """Refuse now (503) images the batcher would refuse anyway once they are prepared:
        their runs' pixels, by the deadline they will be given."""
        deadline = timings.deadline + self._extra_time(sizes, plan)
        try:
            model.batcher.check(_work(sizes, plan), deadline)
        except Rejected as exc:
            raise _refused(exc) from exc

    def _extra_time(self, sizes: list[tuple[int, int]], plan: ScalePlan) -> float:
        """What a large image adds to its deadline: `timeout_s_per_megapixel` per megapixel
        the network sees past the first."""
        megapixels = sum(h * w for h, w in map(plan.inference_size, sizes)) / 1e6
        return self.settings.timeout_s_per_megapixel * max(0.0, megapixels - 1.0)

    def _prepare(
        self,
        rgb: np.ndarray,
        size: tuple[int, int],
        model: ServedModel,
        plan: ScalePlan,
        timings: Timings,
    ) -> DecodedImage:
        """The image as the model takes it: whole (prepared now) or in tiles (each prepared
        when it is queued)."""
        self.metrics.image_pixels.observe(size[0] * size[1])
        grid = plan.grid(rgb.shape[:2])
        timings.note(
            **{
                "segserve.pixels": size[0] * size[1],
                "segserve.tiles": grid.count if grid else 1,
                "segserve.scale": plan.policy,
                "segserve.variant": model.variant,
            }
        )
        if grid is not None:
            return DecodedImage(rgb, size, plan, grid)
        with timings.stage(Stage.PREPROCESS):
            prepared = model.engine.prepare(rgb)
        return DecodedImage(rgb, size, plan, None, prepared)

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
        its work dropped) when the deadline passes or the client leaves. Whole images are
        queued at once; an image in tiles streams them, a batch's worth at a time, so that
        what arrives meanwhile waits for one of its runs, not for all of them."""
        if not model.warmed:
            raise ServiceError(
                503,
                "the model is not ready",
                reason="not_ready",
                code=NOT_READY,
                headers={"Retry-After": "1"},
            )
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            if all(im.grid is None for im in images):
                labels = await self._whole(model, images, timings, gone)
            else:
                labels = await self._in_tiles(model, images, timings, gone)
        finally:
            if gone is not None:
                gone.cancel()
        for im in images:
            tiled = "yes" if im.grid is not None else "no"
            self.metrics.images.labels(model.name, im.plan.policy, tiled).inc()
            if im.grid is not None:
                self.metrics.tiles.labels(model.name).inc(im.grid.count)
        n = model.card.num_classes
        counts = await asyncio.to_thread(
            lambda: [np.bincount(lab.ravel(), minlength=n)[:n] for lab in labels]
        )
        for c in counts:  # what the version predicts: drift without labels
            self.registry.observe_labels(model, c)
        if all(im.grid is None for im in images):  # tiled images are not shadowed
            self.shadow.offer(model, [im.rgb for im in images], labels)
        return labels

    async def _whole(
        self,
        model: ServedModel,
        images: list[DecodedImage],
        timings: Timings,
        gone: asyncio.Future | None,
    ) -> list[np.ndarray]:
        try:
            # The request's clock rides with its jobs: the batcher's hook writes into it.
            jobs = model.batcher.submit(
                [(im.prepared, im.inference_size) for im in images], timings.deadline, timings
            )
        except Rejected as exc:
            raise _refused(exc) from exc
        everything = asyncio.gather(*(j.future for j in jobs))
        waiters = {everything} | ({gone} if gone is not None else set())
        done, _ = await asyncio.wait(waiters, timeout=timings.left(), return_when="FIRST_COMPLETED")
        if everything not in done or everything.exception() is not None:
            for job in jobs:
                job.future.cancel()  # the batcher drops every job of this request not yet run
            everything.add_done_callback(_consume)
        if everything not in done:
            raise self._gone_or_late(gone, done)
        if (exc := everything.exception()) is not None:
            raise self._failed(model, exc) from exc
        return everything.result()

    async def _in_tiles(
        self,
        model: ServedModel,
        images: list[DecodedImage],
        timings: Timings,
        gone: asyncio.Future | None,
    ) -> list[np.ndarray]:
        """Each image's tiles through one stream of the batcher, `window` queued at a time
        (a batch's worth of its tile shape); each tile's kept centre goes into its image's
        label map as it comes back."""
        pieces = deque(
            (i, tile)
            for i, im in enumerate(images)
            for tile in (im.grid.tiles if im.grid is not None else (None,))
        )
        labels: list[np.ndarray | None] = [
            np.empty(im.inference_size, np.uint8) if im.grid is not None else None for im in images
        ]
        window = self._window(model, images)
        sizes = [tile.size if tile else images[i].inference_size for i, tile in pieces]
        try:
            stream = model.batcher.open_stream(
                [h * w for h, w in sizes], timings.deadline, timings, at_once=window
            )
        except Rejected as exc:
            raise _refused(exc) from exc
        running: dict[asyncio.Future, tuple[int, Tile | None]] = {}
        try:
            with stream:
                while pieces or running:
                    while pieces and len(running) < window:
                        i, tile = pieces.popleft()
                        payload, size = await asyncio.to_thread(
                            self._piece, model, images[i], tile, timings
                        )
                        running[stream.submit(payload, size).future] = (i, tile)
                    waiters = set(running) | ({gone} if gone is not None else set())
                    done, _ = await asyncio.wait(
                        waiters, timeout=timings.left(), return_when="FIRST_COMPLETED"
                    )
                    if not done or (gone is not None and gone in done):
                        raise self._gone_or_late(gone, done)
                    for future in done:
                        i, tile = running.pop(future)
                        if (exc := future.exception()) is not None:
                            raise self._failed(model, exc) from exc
                        if tile is None:
                            labels[i] = future.result()
                            continue
                        with timings.stage(Stage.POSTPROCESS):
                            keep_centre(labels[i], future.result(), tile)
        finally:
            for future in running:  # given up: the batcher drops what has not run
                future.cancel()
                future.add_done_callback(_consume)
        return labels  # type: ignore[return-value]

    def _window(self, model: ServedModel, images: list[DecodedImage]) -> int:
        """How many tiles of one request are queued at once: what one batch of its tile
        shape holds (the batch-size and batch-pixel bounds), so that tiles batch together
        while work arriving beside them waits for one run only."""
        limits = model.batcher.limits
        tile_pixels = max(
            (t.pixels for im in images if im.grid is not None for t in im.grid.tiles), default=1
        )
        return max(1, min(limits.max_batch_size, limits.max_batch_pixels // tile_pixels))

    def _piece(
        self, model: ServedModel, image: DecodedImage, tile: Tile | None, timings: Timings
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One tile's pixels as the model takes them (or the whole image's), and its size."""
        if tile is None:
            return image.prepared, image.inference_size
        with timings.stage(Stage.PREPROCESS):
            return model.engine.prepare(tile_pixels(image.rgb, tile)), tile.size

    def _gone_or_late(self, gone: asyncio.Future | None, done: set) -> ServiceError:
        if gone is not None and gone in done:
            return ServiceError(499, "client closed the connection", reason="client_gone")
        return self._deadline_error()

    def _failed(self, model: ServedModel, exc: BaseException) -> ServiceError:
        if isinstance(exc, DeadlineExceeded):
            return self._deadline_error()
        log.error("%s v%s failed on an input: %s", model.name, model.version, exc)
        return ServiceError(500, f"the model failed on this input: {type(exc).__name__}: {exc}")

    def _deadline_error(self) -> ServiceError:
        # A deadline passes when the server is busier than the request could wait for: a
        # client may try again later, as after a 503.
        return ServiceError(
            504,
            f"no result within the {self.settings.request_timeout_s} s deadline",
            reason="deadline",
            headers={"Retry-After": "1"},
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
            header = {"model": model.name, "version": model.version, "inference": image.inference()}
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


def _work(sizes: list[tuple[int, int]], plan: ScalePlan) -> list[int]:
    """The pixels of each run the network will make for images of `sizes`: each tile of a
    tiled image, each other image whole."""
    work = []
    for size in map(plan.inference_size, sizes):
        grid = plan.grid(size)
        work += [t.pixels for t in grid.tiles] if grid else [size[0] * size[1]]
    return work


class _CheckFirst(Exception):
    """Large work: ask the batcher on the event loop before decoding images of `sizes`."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        super().__init__(sizes)
        self.sizes = sizes


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


def _refused(exc: Rejected) -> ServiceError:
    return ServiceError(
        503, str(exc), reason=exc.reason, headers={"Retry-After": str(exc.retry_after)}
    )


def _consume(future: asyncio.Future) -> None:
    """Mark a given-up future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
