"""The inference service: models, engines, batchers, metrics and settings, and the three
steps of every request (decode, segment, render). The HTTP routes are thin on top of it;
it can be driven in-process without any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np

from segserve.contracts.repository import VersionEntry, walk
from segserve.service.batcher import Batcher, DeadlineExceeded, Rejected
from segserve.service.budget import Lease, PixelBudget
from segserve.service.engine import Engine, ProviderUnavailable
from segserve.service.errors import ServiceError
from segserve.service.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedFormat,
    decode_opened,
    fit_size,
    open_image,
    resize_labels,
    resize_rgb,
)
from segserve.service.memory import give_back_memory
from segserve.service.metrics import ServiceMetrics
from segserve.service.planning import CostModel, Limits
from segserve.service.registry import FailedModel, ModelRegistry, ServedModel
from segserve.service.render import RenderSpec, render
from segserve.service.settings import Settings

log = logging.getLogger("segserve")

Timings = dict[str, float]


@dataclass(eq=False)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8, at inference size
    item: np.ndarray  # as the model takes it (engine.prepare)
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
        self.registry = ModelRegistry()
        self.budget = PixelBudget(settings.max_inflight_pixels)
        self.serving = False  # between the end of start() and the beginning of stop()
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every version in the repository, then serve (and, with
        `repository_poll_s`, keep following the repository)."""
        s = self.settings
        if not s.repository.is_dir():
            log.error("model repository %s does not exist", s.repository)
        await self.sync(at_start=True)
        self.serving = True
        log.info("ready: %s", self.unready_reason() or "yes")
        if s.repository_poll_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.sync()
            except Exception:  # a failed look at the repository must not end the watching
                log.exception("could not sync the model repository")

    async def sync(self, at_start: bool = False) -> None:
        """Make the served models what the repository holds: versions that appeared are
        loaded and warmed before they take traffic (the newest of a name serves requests
        that name no version); versions that disappeared stop taking requests and finish
        what they have. A version that fails to load is listed (and retried once its file
        changes); whatever served before goes on serving."""
        entries = {
            (e.name, e.version): e
            for e in await asyncio.to_thread(lambda: list(walk(self.settings.repository)))
        }
        for model in [m for m in self.registry.all() if (m.name, m.version) not in entries]:
            self._retire(model)
        failed = {(f.name, f.version): f for f in self.registry.failed}
        for key, entry in sorted(entries.items()):
            if self.registry.has(*key):
                continue
            mtime = await asyncio.to_thread(lambda e=entry: e.model_path.stat().st_mtime)
            if key in failed and failed[key].mtime == mtime:
                continue  # the same file that failed before
            await self._activate(entry, mtime, at_start)
        for gone in [f for f in self.registry.failed if (f.name, f.version) not in entries]:
            self.registry.failed.remove(gone)
            with contextlib.suppress(KeyError):
                self.metrics.load_failures.remove(gone.name, str(gone.version))
        self._choose_default()

    async def _activate(self, entry: VersionEntry, mtime: float, fatal_provider: bool) -> None:
        try:
            model = await asyncio.to_thread(self._load, entry)
            await asyncio.to_thread(self._warm, model)
        except ProviderUnavailable:
            if fatal_provider:
                raise  # a provider asked for by name must load: a start-up error
            log.exception("could not load %s v%s", entry.name, entry.version)
            self._failed(entry, mtime, "the execution provider asked for did not load")
            return
        except Exception as exc:  # any other load failure is reported, never fatal
            log.error("could not load %s v%s: %s", entry.name, entry.version, exc)
            self._failed(entry, mtime, f"{type(exc).__name__}: {exc}")
            return
        model.batcher.start()
        self.registry.add(model)
        self.registry.failed = [
            f for f in self.registry.failed if (f.name, f.version) != (model.name, model.version)
        ]
        self.metrics.load_failures.labels(model.name, str(model.version)).set(0)
        self.metrics.model_info.labels(*self._info_labels(model)).set(1)
        log.info("serving %s v%s (%s, %s)", model.name, model.version,
                 model.card.architecture, model.engine.provider)  # fmt: skip

    def _failed(self, entry: VersionEntry, mtime: float, error: str) -> None:
        self.registry.failed = [
            f for f in self.registry.failed if (f.name, f.version) != (entry.name, entry.version)
        ] + [FailedModel(entry.name, entry.version, error, mtime)]
        self.metrics.load_failures.labels(entry.name, str(entry.version)).set(1)

    def _retire(self, model: ServedModel) -> None:
        """No new requests reach `model`; what it has queued or running still finishes."""
        self.registry.remove(model)
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(*self._info_labels(model))
        task = asyncio.get_running_loop().create_task(model.batcher.stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("retired %s v%s (gone from the repository)", model.name, model.version)

    @staticmethod
    def _info_labels(model: ServedModel) -> tuple[str, str, str, str]:
        return model.name, str(model.version), model.engine.provider, model.card.architecture

    def _choose_default(self) -> None:
        wanted = self.settings.default_model
        if wanted:
            if wanted not in self.registry.models and self.registry.default_name != wanted:
                log.error("default model %r is not loaded", wanted)
            self.registry.default_name = wanted  # unready until it is loaded
        elif self.registry.default_name not in self.registry.models:
            names = sorted(self.registry.models)
            self.registry.default_name = names[0] if names else None

    @property
    def ready(self) -> bool:
        return not self.unready_reason()

    def unready_reason(self) -> str:
        """Why the server cannot serve, or "" when it can: started, not stopping, and the
        default model and every required model loaded and warm. Other models that failed do
        not count (they are in /models and segserve_model_load_failures). No file paths in
        the reason: /readyz is public."""
        if not self.serving:
            return "starting or shutting down"
        needed = [self.registry.default_name, *self.settings.required]
        if needed[0] is None:
            return (
                "no model is loaded" if not self.registry.failed else "no model loaded successfully"
            )
        missing = [n for n in needed if n not in self.registry.models]
        if missing:
            return f"required models not loaded: {', '.join(sorted(set(missing)))}"
        cold = [n for n in needed if not self.registry.get(n).warmed]
        if cold:
            return f"models warming up: {', '.join(sorted(set(cold)))}"
        return ""

    async def stop(self) -> None:
        """Refuse new work and finish what is queued (after the server stopped accepting)."""
        self.serving = False
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*(m.batcher.stop() for m in self.registry.all()), *self._retiring)

    def _load(self, entry: VersionEntry) -> ServedModel:
        s = self.settings
        engine = Engine.load(
            entry.model_path, s.providers, s.intra_op_threads, s.cudnn_conv_algo_search,
            cpu_arena=s.cpu_mem_arena, spinning=s.ort_spinning,
            arena_shrink_pixels=s.arena_shrink_pixels,
        )  # fmt: skip
        name = entry.name

        def on_batch(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(name).observe(size)

        batcher = Batcher(
            engine.batch,
            engine.run,
            Limits(
                s.batch_size_for(engine.provider),
                min(s.max_batch_pixels, engine.batch_pixel_limit or s.max_batch_pixels),
                engine.card.size_divisor,
            ),
            CostModel(),
            max_queue=s.max_queue,
            max_queued_pixels=s.max_queued_pixels,
            max_queue_delay_ms=s.max_queue_delay_ms,
            on_batch=on_batch,
        )
        return ServedModel(name, entry.version, engine, batcher)

    def _warm(self, model: ServedModel) -> None:
        """Run the warm-up shapes once each (first runs allocate and pick kernels) and give
        the cost model its first measurements, before the model takes traffic."""
        for h, w in self.settings.warmup:
            image = np.zeros((h, w, 3), np.uint8)
            t0 = time.perf_counter()
            model.engine.segment([image])
            model.batcher.cost.observe(h * w, time.perf_counter() - t0)
        model.warmed = True

    # -- the three steps of a request ----------------------------------------------------

    def model(self, name: str | None, version: int | None = None) -> ServedModel:
        return self.registry.get(name, version)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """A request's share of the in-flight pixel budget, given back when it ends."""
        lease = Lease(self.budget)
        try:
            yield lease
        finally:
            lease.release()

    def _check_request(self, pixels: int, count: int) -> None:
        s = self.settings
        if count > s.max_images_per_request:
            raise ServiceError(
                413,
                f"{count} images in one request; the limit is {s.max_images_per_request}",
                reason="too_many_images",
            )
        if pixels > s.max_request_pixels:
            raise ServiceError(
                413,
                f"the request's images have {pixels} pixels together; the limit is "
                f"{s.max_request_pixels}",
                reason="too_many_pixels",
            )

    async def _take(self, lease: Lease, pixels: int, deadline: float) -> None:
        if not await lease.take(pixels, deadline - time.monotonic()):
            raise ServiceError(
                503,
                "busy with other large images: no room for this one's pixels before its deadline",
                reason="pixel_budget",
                headers={"Retry-After": "1"},
            )

    def _decode_sync(
        self, blobs: list[bytes], model: ServedModel, timings: Timings, lease: Lease
    ) -> list[DecodedImage] | int:
        """Encoded images to the model's input, in one worker thread. Headers first: the
        request's pixels must fit its limits and the budget before any pixel is decoded;
        when the budget has no room now, the pixels needed are returned instead (the caller
        waits on the event loop, not in this thread, and calls again)."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            opened = [open_image(b, s.max_image_pixels, s.formats) for b in blobs]
            pixels = sum(probe.pixels for _, probe in opened)
            self._check_request(pixels, len(blobs))
            if lease.held < pixels and not lease.try_take(pixels - lease.held):
                return pixels - lease.held
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
        timings["decode"] = time.perf_counter() - t0
        self.metrics.stage_duration.labels(model.name, "decode").observe(timings["decode"])
        return [
            self._prepare(rgb, (probe.height, probe.width), model, timings)
            for rgb, probe in decoded
        ]

    def _prepare(
        self, rgb: np.ndarray, size: tuple[int, int], model: ServedModel, timings: Timings
    ) -> DecodedImage:
        t0 = time.perf_counter()
        item = model.engine.prepare(rgb)
        timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - t0
        self.metrics.image_pixels.observe(size[0] * size[1])
        return DecodedImage(rgb, item, size)

    async def decode(
        self,
        blobs: list[bytes],
        model: ServedModel,
        timings: Timings,
        lease: Lease,
        deadline: float,
    ) -> list[DecodedImage]:
        """Encoded images (one request's) to the model's input: one worker hop, two when the
        request had to wait for pixel budget."""
        result = await asyncio.to_thread(self._decode_sync, blobs, model, timings, lease)
        if isinstance(result, int):
            await self._take(lease, result, deadline)
            result = await asyncio.to_thread(self._decode_sync, blobs, model, timings, lease)
        return result

    async def from_pixels(
        self,
        arrays: np.ndarray,
        model: ServedModel,
        timings: Timings,
        lease: Lease,
        deadline: float,
    ) -> list[DecodedImage]:
        """Raw RGB pixels (N x H x W x 3 uint8, one request's) to the model's input."""
        n, h, w = arrays.shape[:3]
        self._check_request(n * h * w, n)
        await self._take(lease, n * h * w, deadline)
        fit = fit_size(w, h, self.settings.max_inference_pixels)

        def prepare() -> list[DecodedImage]:
            return [
                self._prepare(resize_rgb(im, fit[1], fit[0]), (h, w), model, timings)
                for im in arrays
            ]

        return await asyncio.to_thread(prepare)

    async def segment(
        self,
        model: ServedModel,
        images: list[DecodedImage],
        deadline: float,
        timings: Timings,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> list[np.ndarray]:
        """Labels for every image of one request, through the model's batcher: admitted
        as a whole or refused at once; given up as a whole (the rest of its work dropped)
        when the deadline passes or the client leaves."""
        if not self.ready and not model.warmed:
            raise ServiceError(
                503, "the server is not ready", reason="not_ready", headers={"Retry-After": "1"}
            )
        try:
            jobs = model.batcher.submit([(im.item, im.inference_size) for im in images], deadline)
        except Rejected as exc:
            raise ServiceError(
                503, str(exc), reason=exc.reason, headers={"Retry-After": str(exc.retry_after)}
            ) from exc
        self.metrics.queue_depth.labels(model.name).set(model.batcher.depth)
        everything = asyncio.gather(*(j.future for j in jobs))
        waiters: set[asyncio.Future] = {everything}
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if gone is not None:
            waiters.add(gone)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when="FIRST_COMPLETED",
            )
        finally:
            if gone is not None:
                gone.cancel()
        if everything not in done:
            for job in jobs:
                job.future.cancel()  # the batcher drops every job of this request not yet run
            everything.add_done_callback(_consume)
            if gone is not None and gone in done:
                raise ServiceError(499, "client closed the connection", reason="client_gone")
            raise self._deadline_error()
        if everything.exception() is not None:
            for job in jobs:
                job.future.cancel()
            exc = everything.exception()
            if isinstance(exc, DeadlineExceeded):
                raise self._deadline_error() from exc
            log.error("%s v%s failed on an input: %s", model.name, model.version, exc)
            raise ServiceError(
                500, f"the model failed on this input: {type(exc).__name__}: {exc}"
            ) from exc
        first = jobs[0].timings
        timings["preprocess"] = timings.get("preprocess", 0.0) + first.get("batch", 0.0)
        timings.update(queue=first.get("queue", 0.0), inference=first.get("inference", 0.0))
        for stage in ("queue", "preprocess", "inference"):
            self.metrics.stage_duration.labels(model.name, stage).observe(timings[stage])
        return everything.result()

    def _deadline_error(self) -> ServiceError:
        return ServiceError(
            504,
            f"no result within the {self.settings.request_timeout_s} s deadline",
            reason="deadline",
        )

    def _render_sync(
        self, model: ServedModel, image: DecodedImage, labels: np.ndarray, spec: RenderSpec,
        timings: Timings, started: float,
    ) -> tuple[bytes, str]:  # fmt: skip
        t0 = time.perf_counter()
        h, w = image.size
        labels = resize_labels(labels, h, w)
        rgb = resize_rgb(image.rgb, h, w) if spec.format == "overlay" else image.rgb
        header: dict = {"model": model.name, "version": model.version}
        if image.scaled:
            header["inference_size"] = [image.inference_size[1], image.inference_size[0]]
        scale_s = time.perf_counter() - t0
        out = render(rgb, labels, model.card, spec, header, timings, started)
        timings["postprocess"] += scale_s
        del labels, rgb
        give_back_memory(h * w)  # the decode and render buffers of a large image
        return out

    async def render(
        self,
        model: ServedModel,
        image: DecodedImage,
        labels: np.ndarray,
        spec: RenderSpec,
        timings: Timings,
        started: float,
    ) -> tuple[bytes, str]:
        """The answer in the asked format, at the image's own size, in one worker hop."""
        out = await asyncio.to_thread(
            self._render_sync, model, image, labels, spec, timings, started
        )
        for stage in ("postprocess", "encode"):
            self.metrics.stage_duration.labels(model.name, stage).observe(timings[stage])
        return out


def _consume(future: asyncio.Future) -> None:
    """Mark a given-up future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
