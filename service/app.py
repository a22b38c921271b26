"""The FastAPI app: /segment, /models, health, /metrics and the Open Inference Protocol.

Side effects live here and in the lifespan (loading, warming, the batchers); the work
itself is in the pure functions of imaging.py and the batcher.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segserve.service.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from segserve.service.body import image_bytes
from segserve.service.engine import Engine
from segserve.service.errors import ServiceError, install_error_handlers
from segserve.service.imaging import (
    ImageDecodeError,
    ImageTooLarge,
    class_stats,
    decode_image,
    encode_label_png,
    encode_mask_png,
    encode_rgb,
    encode_rle,
    overlay,
    padded_size,
    preprocess,
)
from segserve.service.metrics import ServiceMetrics
from segserve.service.repository import LoadedModel, ModelRegistry
from segserve.service.settings import Settings

log = logging.getLogger("segserve")


class State:
    """What the app holds between requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.registry = ModelRegistry()
        self.ready = False


def route_label(path: str) -> str:
    """A bounded set of route labels for the metrics (no per-model or per-id paths)."""
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "/v2/infer"
    if path.startswith("/v2"):
        return "/v2"
    if path.startswith("/models"):
        return "/models"
    return path if path in ("/segment", "/healthz", "/readyz", "/metrics") else "other"


class MetricsMiddleware:
    """requests_total, request_duration_seconds and inflight_requests for every request."""

    def __init__(self, app, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m, start, status, model = self.state.metrics, time.perf_counter(), 500, ""

        async def send_wrapper(message):
            nonlocal status, model
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-model":
                        model = v.decode()
            await send(message)

        route = route_label(scope["path"])
        m.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.inflight.dec()
            if route != "/metrics":
                m.requests.labels(model, route, str(status)).inc()
                m.request_duration.labels(model, route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = State(settings)

    def load_engine(path):
        return Engine.load(
            path, settings.providers, settings.intra_op_threads, settings.cudnn_conv_algo_search
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = await asyncio.to_thread(ModelRegistry.scan, settings.repository, load_engine)
        if settings.default_model and settings.default_model in registry.models:
            registry.default_name = settings.default_model
        elif settings.default_model:
            log.error("default model %r is not loaded", settings.default_model)
        else:
            registry.default_name = next(iter(sorted(registry.models)), None)
        state.registry = registry
        for model in registry.all():
            model.batcher = make_batcher(model)
            model.batcher.start()
            state.metrics.model_info.labels(
                model.name, str(model.version), model.engine.provider, model.card.architecture
            ).set(1)
        for model in registry.all():
            await asyncio.to_thread(warm, model)
        state.ready = not registry.failed and bool(registry.models)
        log.info("ready: %s", state.ready)
        yield
        # Shutdown (after uvicorn stopped accepting and open requests finished): drain queues.
        state.ready = False
        await asyncio.gather(*(m.batcher.stop() for m in registry.all() if m.batcher))

    def make_batcher(model: LoadedModel) -> Batcher:
        card = model.card

        def on_batch(size: int) -> None:
            # Stage times are observed per request in segment_array, not here per batch.
            state.metrics.batch_size.labels(model.name).observe(size)

        return Batcher(
            model.engine.run, card.mean, card.std, card.input_dtype, card.size_divisor,
            settings.max_batch_size, settings.max_queue_delay_ms, settings.max_queue,
            settings.max_padding_fraction, on_batch,
        )  # fmt: skip

    def warm(model: LoadedModel) -> None:
        for h, w in settings.warmup:
            image = np.zeros((h, w, 3), np.uint8)
            ph, pw = padded_size(h, w, model.card.size_divisor)
            model.engine.run(
                preprocess(
                    [image],
                    model.card.mean,
                    model.card.std,
                    model.card.input_dtype,
                    size=(ph, pw),
                )
            )
        model.warmed = True

    app = FastAPI(
        title="segserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Semantic segmentation as a service.",
    )
    app.state.segserve = state
    app.add_middleware(MetricsMiddleware, state=state)
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), settings.api_key.encode()
        ):
            state.metrics.rejected.labels("unauthorized").inc()
            raise ServiceError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def reject(reason: str, exc: ServiceError) -> ServiceError:
        state.metrics.rejected.labels(reason).inc()
        return exc

    async def segment_array(
        model: LoadedModel, rgb: np.ndarray, request: Request | None, timings: dict
    ) -> np.ndarray:
        """Queue one decoded image on its model's batcher and wait for its labels."""
        if not state.ready and not model.warmed:
            raise reject(
                "not_ready",
                ServiceError(503, "the server is not ready", headers={"Retry-After": "1"}),
            )
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            job = model.batcher.submit(rgb, deadline)
        except QueueFull as exc:
            raise reject(
                "queue_full", ServiceError(503, str(exc), headers={"Retry-After": "1"})
            ) from exc
        except ShuttingDown as exc:
            raise reject(
                "shutting_down", ServiceError(503, str(exc), headers={"Retry-After": "5"})
            ) from exc
        state.metrics.queue_depth.labels(model.name).set(model.batcher.depth)
        waiters = {job.future}
        disconnect = None
        if request is not None:
            disconnect = asyncio.ensure_future(wait_for_disconnect(request))
            waiters.add(disconnect)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if disconnect is not None:
                disconnect.cancel()
        if job.future not in done:
            job.future.cancel()  # the batcher skips it: no inference for a gone client
            if disconnect is not None and disconnect in done:
                raise reject(
                    "client_gone",
                    ServiceError(499, "client closed the connection", code="client_closed"),
                )
            raise reject(
                "deadline",
                ServiceError(504, f"no result within the {settings.request_timeout_s} s deadline"),
            )
        try:
            labels = job.future.result()
        except DeadlineExceeded as exc:
            raise reject("deadline", ServiceError(504, str(exc))) from exc
        timings.update(job.timings)
        for stage in ("queue", "preprocess", "inference"):
            if stage in job.timings:
                state.metrics.stage_duration.labels(model.name, stage).observe(job.timings[stage])
        return labels

    async def wait_for_disconnect(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def decode(data: bytes) -> np.ndarray:
        try:
            rgb = decode_image(data, settings.max_image_pixels)
        except ImageTooLarge as exc:
            raise reject("too_many_pixels", ServiceError(413, str(exc))) from exc
        except ImageDecodeError as exc:
            raise reject("bad_image", ServiceError(400, str(exc))) from exc
        state.metrics.image_pixels.observe(rgb.shape[0] * rgb.shape[1])
        return rgb

    def parse_masks(spec: str, model: LoadedModel) -> list[int]:
        spec = spec.strip()
        if spec in ("", "none"):
            return []
        if spec == "all":
            return list(range(model.card.num_classes))
        ids = []
        for key in (k.strip() for k in spec.split(",") if k.strip()):
            try:
                ids.append(model.card.class_id(key))
            except KeyError:
                raise ServiceError(
                    422,
                    f"masks: unknown class {key!r}; classes are {', '.join(model.card.class_names)}",
                ) from None
        return ids

    @app.post("/segment", dependencies=[Depends(authorize)])
    async def segment(
        request: Request,
        model: str | None = Query(
            None, description="model name; default: the server's default model"
        ),
        version: int | None = Query(None, ge=1, description="model version; default: the newest"),
        format: Literal["png", "json", "overlay"] = Query("png"),
        masks: str = Query(
            "none", description="none | all | comma-separated class names or ids (format=json)"
        ),
        mask_encoding: Literal["png", "rle"] = Query("png"),
    ) -> Response:
        t0 = time.perf_counter()
        loaded = state.registry.get(model, version)
        try:
            return await segment_with(request, loaded, format, masks, mask_encoding, t0)
        except ServiceError as exc:
            # Errors past model resolution still say which model answered.
            exc.headers = {
                "X-Model": loaded.name,
                "X-Model-Version": str(loaded.version),
                **exc.headers,
            }
            raise

    async def segment_with(
        request: Request,
        loaded: LoadedModel,
        format: str,
        masks: str,
        mask_encoding: str,
        t0: float,
    ) -> Response:
        mask_ids = parse_masks(masks, loaded)
        if mask_ids and format != "json":
            raise ServiceError(422, "masks come with format=json")
        try:
            data = await image_bytes(request, settings.max_body_bytes)
        except ServiceError as exc:
            state.metrics.rejected.labels(
                {413: "body_too_large", 415: "media_type"}.get(exc.status, "bad_body")
            ).inc()
            raise
        td = time.perf_counter()
        rgb = await asyncio.to_thread(decode, data)
        timings = {"decode": time.perf_counter() - td}
        state.metrics.stage_duration.labels(loaded.name, "decode").observe(timings["decode"])
        labels = await segment_array(loaded, rgb, request, timings)
        tp = time.perf_counter()
        body, media_type = await asyncio.to_thread(
            render, loaded, rgb, labels, format, mask_ids, mask_encoding, timings, t0
        )
        state.metrics.stage_duration.labels(loaded.name, "encode").observe(time.perf_counter() - tp)
        timings["total"] = time.perf_counter() - t0
        headers = {
            "X-Model": loaded.name,
            "X-Model-Version": str(loaded.version),
            "Server-Timing": ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timings.items()),
        }
        return Response(body, media_type=media_type, headers=headers)

    def render(
        loaded: LoadedModel, rgb, labels, fmt, mask_ids, mask_encoding, timings, t0
    ) -> tuple[bytes, str]:
        card = loaded.card
        tp = time.perf_counter()
        if fmt == "png":
            out = encode_label_png(labels, card.palette), "image/png"
        elif fmt == "overlay":
            out = encode_rgb(overlay(rgb, labels, card.palette)), "image/png"
        else:
            counts = class_stats(labels, card.num_classes)
            total = int(labels.size)
            encoded_masks = {}
            for cid in mask_ids:
                mask = labels == cid
                encoded_masks[card.class_names[cid]] = (
                    encode_rle(mask)
                    if mask_encoding == "rle"
                    else base64.b64encode(encode_mask_png(mask)).decode()
                )
            timings["postprocess"] = time.perf_counter() - tp
            payload = {
                "model": loaded.name,
                "version": loaded.version,
                "width": int(labels.shape[1]),
                "height": int(labels.shape[0]),
                "classes": [
                    {
                        "id": int(i),
                        "name": card.class_names[i],
                        "color": card.palette[i],
                        "pixels": int(counts[i]),
                        "fraction": counts[i] / total,
                    }
                    for i in np.flatnonzero(counts)
                ],
                "label_png": base64.b64encode(encode_label_png(labels, card.palette)).decode(),
                "masks": encoded_masks,
                "timings_ms": {
                    k: round(v * 1000, 3)
                    for k, v in {**timings, "total": time.perf_counter() - t0}.items()
                    if k in ("decode", "queue", "inference", "postprocess", "total")
                },
            }
            return json.dumps(payload).encode(), "application/json"
        timings["postprocess"] = time.perf_counter() - tp
        return out

    @app.get("/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        return {
            "default": state.registry.default_name,
            "models": [model_summary(m) for m in state.registry.all()],
            "failed": [
                {"name": f.name, "version": f.version, "error": f.error}
                for f in state.registry.failed
            ],
        }

    def model_summary(m: LoadedModel) -> dict:
        card = m.card
        return {
            "name": m.name,
            "version": m.version,
            "versions": sorted(state.registry.models[m.name]),
            "architecture": card.architecture,
            "provider": m.engine.provider,
            "ready": m.warmed,
            "classes": [
                {"id": i, "name": n, "color": card.palette[i]}
                for i, n in enumerate(card.class_names)
            ],
            "input": {
                "mean": card.mean,
                "std": card.std,
                "dtype": card.input_dtype,
                "size_divisor": card.size_divisor,
            },
            "output": card.output,
        }

    @app.get("/models/{name}", dependencies=[Depends(authorize)])
    async def get_model(name: str, version: int | None = Query(None, ge=1)) -> dict:
        m = state.registry.get(name, version)
        return {**model_summary(m), "card": m.card.as_dict()}

    @app.get("/models/{name}/palette.png", dependencies=[Depends(authorize)])
    async def palette_png(name: str, version: int | None = Query(None, ge=1)) -> Response:
        from segserve.service.legend import legend_png

        m = state.registry.get(name, version)
        return Response(
            legend_png(m.card.class_names, m.card.palette),
            media_type="image/png",
            headers={"X-Model": m.name, "X-Model-Version": str(m.version)},
        )

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready", "models": sorted(state.registry.models)})
        failed = [f"{f.name}/{f.version}: {f.error}" for f in state.registry.failed]
        detail = (
            "models failed to load: " + "; ".join(failed)
            if failed
            else "models are loading or warming up"
        )
        return JSONResponse(
            {"error": "not_ready", "detail": detail}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        for m in state.registry.all():
            if m.batcher is not None:
                state.metrics.queue_depth.labels(m.name).set(m.batcher.depth)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from segserve.service.v2 import build_v2_router

    app.include_router(build_v2_router(state, segment_array, authorize))
    return app
