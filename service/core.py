"""The inference service: models, engines, batchers, metrics and settings, and the three
steps of every request (decode, segment, render). The HTTP routes are thin on top of it;
it can be driven in-process without any of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from segserve.contracts.repository import VersionEntry, walk
from segserve.service.batcher import Batcher, DeadlineExceeded, Rejected
from segserve.service.engine import Engine, ProviderUnavailable
from segserve.service.errors import ServiceError
from segserve.service.imaging import ImageDecodeError, ImageTooLarge, decode_image
from segserve.service.metrics import ServiceMetrics
from segserve.service.planning import CostModel, Limits
from segserve.service.registry import FailedModel, ModelRegistry, ServedModel
from segserve.service.render import RenderSpec, render
from segserve.service.settings import Settings

log = logging.getLogger("segserve")

Timings = dict[str, float]


@dataclass(eq=False)
class DecodedImage:
    rgb: np.ndarray  # H x W x 3 uint8
    item: np.ndarray  # as the model takes it (engine.prepare)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


class InferenceService:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.registry = ModelRegistry()
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load every version in the repository, start its batcher, warm it; then ready."""
        s = self.settings
        if not s.repository.is_dir():
            log.error("model repository %s does not exist", s.repository)
            self.registry.failed.append(FailedModel("*", 0, "the model repository does not exist"))
        for entry in await asyncio.to_thread(lambda: list(walk(s.repository))):
            try:
                model = await asyncio.to_thread(self._load, entry)
            except ProviderUnavailable:
                raise  # a provider asked for by name must load: a start-up error
            except Exception as exc:  # any other load failure is reported, never fatal
                log.error("could not load %s v%s: %s", entry.name, entry.version, exc)
                self.registry.failed.append(
                    FailedModel(entry.name, entry.version, f"{type(exc).__name__}: {exc}")
                )
                continue
            self.registry.add(model)
            model.batcher.start()
            log.info(
                "loaded %s v%s (%s, %s)",
                model.name,
                model.version,
                model.card.architecture,
                model.engine.provider,
            )
        names = sorted(self.registry.models)
        if s.default_model and s.default_model in self.registry.models:
            self.registry.default_name = s.default_model
        elif s.default_model:
            log.error("default model %r is not loaded", s.default_model)
        else:
            self.registry.default_name = names[0] if names else None
        for model in self.registry.all():
            await asyncio.to_thread(self._warm, model)
            self.metrics.model_info.labels(
                model.name, str(model.version), model.engine.provider, model.card.architecture
            ).set(1)
        self.ready = not self.registry.failed and bool(self.registry.models)
        log.info("ready: %s", self.ready)

    async def stop(self) -> None:
        """Refuse new work and finish what is queued (after the server stopped accepting)."""
        self.ready = False
        await asyncio.gather(*(m.batcher.stop() for m in self.registry.all()))

    def _load(self, entry: VersionEntry) -> ServedModel:
        s = self.settings
        engine = Engine.load(
            entry.model_path, s.providers, s.intra_op_threads, s.cudnn_conv_algo_search,
            cpu_arena=s.cpu_mem_arena, spinning=s.ort_spinning,
        )  # fmt: skip
        name = entry.name

        def on_batch(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(name).observe(size)

        batcher = Batcher(
            engine.batch,
            engine.run,
            Limits(s.batch_size_for(engine.provider), s.max_batch_pixels, engine.card.size_divisor),
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

    def decode_sync(self, data: bytes, model: ServedModel, timings: Timings) -> DecodedImage:
        """Encoded bytes to the model's input, in the caller's thread (one worker hop)."""
        t0 = time.perf_counter()
        try:
            rgb = decode_image(data, self.settings.max_image_pixels)
        except ImageTooLarge as exc:
            raise ServiceError(413, str(exc), reason="too_many_pixels") from exc
        except ImageDecodeError as exc:
            raise ServiceError(400, str(exc), reason="bad_image") from exc
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
        self.metrics.stage_duration.labels(model.name, "decode").observe(timings["decode"])
        return self.accept_pixels(rgb, model, timings)

    def accept_pixels(self, rgb: np.ndarray, model: ServedModel, timings: Timings) -> DecodedImage:
        """Decoded RGB pixels (H x W x 3 uint8) to the model's input."""
        t0 = time.perf_counter()
        item = model.engine.prepare(rgb)
        timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - t0
        self.metrics.image_pixels.observe(rgb.shape[0] * rgb.shape[1])
        return DecodedImage(rgb, item)

    async def decode(self, data: bytes, model: ServedModel, timings: Timings) -> DecodedImage:
        return await asyncio.to_thread(self.decode_sync, data, model, timings)

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
            jobs = model.batcher.submit([(im.item, im.size) for im in images], deadline)
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
            raise exc
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

    async def render(
        self,
        model: ServedModel,
        image: DecodedImage,
        labels: np.ndarray,
        spec: RenderSpec,
        timings: Timings,
        started: float,
    ) -> tuple[bytes, str]:
        header = {"model": model.name, "version": model.version}
        out = await asyncio.to_thread(
            render, image.rgb, labels, model.card, spec, header, timings, started
        )
        for stage in ("postprocess", "encode"):
            self.metrics.stage_duration.labels(model.name, stage).observe(timings[stage])
        return out


def _consume(future: asyncio.Future) -> None:
    """Mark a given-up future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
