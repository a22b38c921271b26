"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, what
tritonclient.grpc, Triton, KServe and MLServer speak), and `grpc.health.v1` beside it for
Kubernetes' gRPC probes. Off unless `grpc_port` is set.

The same pipeline as HTTP v2: the request's `image` input (UINT8 [N, H, W, 3] or BYTES [N]
encoded images, as raw contents) goes through `open_inference.image_input` (the same counts
and pixel limits, checked before anything is unpacked), the pixel budget, the batcher and
its deadlines; the answer is `labels` UINT8 [N, H, W] as raw output contents (the only form
tritonclient.grpc's `as_numpy` reads). The API key comes as `authorization: Bearer KEY`
metadata; the client's deadline shortens the request's. Errors carry gRPC status codes:
400/415/422 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED,
503 UNAVAILABLE (with a retry-after trailer), 504 DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from functools import wraps

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from segserve.service.auth import bearer_token, token_matches
from segserve.service.errors import ServiceError
from segserve.service.pipeline import InferenceService
from segserve.service.protocols import grpc_predict_v2_pb2 as pb
from segserve.service.protocols import grpc_predict_v2_pb2_grpc as pb_grpc
from segserve.service.protocols import open_inference
from segserve.service.telemetry.clock import Timings

log = logging.getLogger("segserve")
SERVICE_NAME = "inference.GRPCInferenceService"
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def answering(method: Callable) -> Callable:
    """A servicer method whose ServiceErrors become gRPC statuses (and metrics)."""

    @wraps(method)
    async def run(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        status, model = 200, getattr(request, "model_name", "") or getattr(request, "name", "")
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            status = exc.status
            if exc.status >= 400 and exc.status != 404:
                self.service.metrics.rejected.labels(exc.reason or str(exc.status)).inc()
            trailers = tuple((k.lower(), v) for k, v in (exc.headers or {}).items())
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(STATUS.get(exc.status, grpc.StatusCode.INTERNAL), exc.detail)
        finally:
            route = f"/{SERVICE_NAME}/{method.__name__}"
            metrics = self.service.metrics
            metrics.requests.labels(model or "-", route, str(status)).inc()
            metrics.request_duration.labels(model or "-", route).observe(time.perf_counter() - t0)

    return run


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        key = self.service.settings.api_key
        if key is None:  # as over HTTP: an empty key is a key no one can send, not "no key"
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization")
        if not token_matches(bearer_token(sent), key):
            raise ServiceError(
                401, "missing or wrong API key (authorization: Bearer KEY)", reason="unauthorized"
            )

    def _model(self, name: str, version: str):
        if version and not (version.isascii() and version.isdigit()):
            raise open_inference.bad(f"model version must be a number, not {version!r}")
        return self.service.registry.get(name or None, int(version) if version else None)

    @answering
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @answering
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.registry.ready)

    @answering
    async def ModelReady(self, request, context):
        self._authorize(context)
        return pb.ModelReadyResponse(ready=self._model(request.name, request.version).warmed)

    @answering
    async def ServerMetadata(self, request, context):
        self._authorize(context)
        return pb.ServerMetadataResponse(**open_inference.server_metadata())

    @answering
    async def ModelMetadata(self, request, context):
        self._authorize(context)
        model = self._model(request.name, request.version)
        meta = open_inference.model_metadata(model.name, self.service.registry.versions(model.name))
        tensors = {
            key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta.pop(key)]
            for key in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(**meta, **tensors)

    @answering
    async def ModelInfer(self, request, context):
        self._authorize(context)
        service, s = self.service, self.service.settings
        model = self._model(request.model_name, request.model_version)
        timings = Timings(s.request_timeout_s)
        remaining = context.time_remaining()
        if remaining is not None and remaining < timings.left():
            timings.deadline = timings.arrived + remaining  # the client's deadline comes first
        tracing = service.tracing
        if not tracing.enabled:
            return await self._infer(request, context, model, timings)
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        span = tracing.start_request(f"/{SERVICE_NAME}/ModelInfer", carrier, timings)
        context.set_trailing_metadata((("x-trace-id", tracing.trace_id(span)),))
        status = "OK"
        try:
            return await self._infer(request, context, model, timings)
        except ServiceError as exc:
            status = STATUS.get(exc.status, grpc.StatusCode.INTERNAL).name
            raise
        finally:
            attributes = {
                "rpc.system": "grpc",
                "rpc.grpc.status_code": status,
                "segserve.model": model.name,
                "segserve.version": str(model.version),
                **timings.notes,
            }
            tracing.end_request(span, timings, **attributes)

    async def _infer(self, request, context, model, timings: Timings):
        service = self.service
        req, binary = as_infer_request(request)
        tensor = await asyncio.to_thread(open_inference.image_input, req, binary, service.limits)
        scale = req.parameters.scale if req.parameters else None
        plan = service.scale_plan(model, scale)
        async with service.lease() as lease:
            if isinstance(tensor, list):
                images = await service.decode(tensor, model, timings, lease, plan)
                open_inference.require_one_size([im.size for im in images])
            else:
                images = await service.from_pixels(tensor, model, timings, lease, plan)
            labels = await service.segment(model, images, timings)
            stacked = await service.encode_labels(images, labels, _stack, timings)
        service.metrics.observe_stages(timings, model.name)
        return pb.ModelInferResponse(
            model_name=model.name,
            model_version=str(model.version),
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name="labels", datatype="UINT8", shape=list(stacked.shape)
                )
            ],
            raw_output_contents=[stacked.tobytes()],
        )


def _stack(labels: list[np.ndarray]) -> np.ndarray:
    return np.stack(labels)


def as_infer_request(
    request: pb.ModelInferRequest,
) -> tuple[open_inference.InferRequest, bytes]:
    """The protobuf request as the HTTP path's validated request and binary part: raw
    contents become binary tensor data in the inputs' order; typed contents are accepted for
    BYTES (encoded images) only, the UINT8 pixels must come raw."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise open_inference.bad(
            f"{len(request.raw_input_contents)} raw input contents for {len(request.inputs)} inputs"
        )
    inputs, binary = [], []
    for i, tensor in enumerate(request.inputs):
        spec: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            spec["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        elif tensor.datatype == "BYTES" and tensor.contents.bytes_contents:
            spec["data"] = [base64.b64encode(b).decode() for b in tensor.contents.bytes_contents]
        inputs.append(spec)
    parameters = {}
    scale = request.parameters.get("scale")
    if scale is not None:
        parameters["scale"] = scale.string_param
    body = {"inputs": inputs, "parameters": parameters or None, "id": request.id or None}
    for out in request.outputs:
        if out.name != "labels":
            raise open_inference.bad(f"unknown output {out.name!r}: the model's output is 'labels'")
    try:
        req = open_inference.InferRequest.model_validate(body)
    except ValueError as exc:
        raise open_inference.bad(f"invalid inference request: {exc}") from None
    return req, b"".join(binary)


async def start(
    service: InferenceService, host: str, port: int
) -> tuple[grpc.aio.Server, asyncio.Task, int]:
    """The gRPC server on host:port (0: any free port), the task that keeps its health status
    in step with readiness, and the port. Messages above `max_body_bytes` are refused by gRPC
    itself (RESOURCE_EXHAUSTED)."""
    s = service.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", s.max_body_bytes),
            ("grpc.max_send_message_length", s.max_request_pixels + (1 << 20)),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen for gRPC on {host}:{port}")
    await server.start()
    log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s:%s", host, bound)

    async def follow_readiness() -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            status = serving if service.registry.ready else not_serving
            for name in ("", SERVICE_NAME):
                await checker.set(name, status)
            await asyncio.sleep(0.5)

    return server, asyncio.get_running_loop().create_task(follow_readiness()), bound


async def stop(server: grpc.aio.Server, follower: asyncio.Task, grace: float = 5.0) -> None:
    follower.cancel()
    await server.stop(grace)
