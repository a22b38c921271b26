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


def _forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of an error and the errors behind it: they hold the frames of the
    call, whose locals hold its message."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def answering(method: Callable) -> Callable:
    """A servicer method whose ServiceErrors become gRPC statuses (and metrics)."""

    @wraps(method)
    async def run(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        status = 200
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            status = exc.status
            if exc.status >= 400 and exc.status != 404:
                self.service.metrics.rejected.labels(exc.reason or str(exc.status)).inc()
            trailers = tuple((k.lower(), v) for k, v in (exc.headers or {}).items())
            if trailers:
                context.set_trailing_metadata(trailers)
            # abort() raises in its turn, with this error as its context: without their
            # tracebacks the frames of the call (holding a 20 MB message) are not kept alive
            # in grpc.aio's reference cycles until a full garbage collection.
            _forget_frames(exc)
            await context.abort(STATUS.get(exc.status, grpc.StatusCode.INTERNAL), exc.detail)
        finally:
            model = getattr(request, "model_name", "") or getattr(request, "name", "")
            route = f"/{SERVICE_NAME}/{method.__name__}"
            metrics = self.service.metrics
            metrics.requests.labels(model or "-", route, str(status)).inc()
            metrics.request_duration.labels(model or "-", route).observe(time.perf_counter() - t0)

    return run


class OneMessage:
    """The one ModelInferRequest of a call, read when asked for; its model names the call
    in the metrics once read."""

    def __init__(self, requests) -> None:
        self.requests, self.model_name = requests, ""

    async def read(self) -> pb.ModelInferRequest:
        messages = aiter(self.requests)
        request = await anext(messages, None)
        # Closed, not left suspended: a suspended generator holds its last message (20 MB)
        # until a full garbage collection (measured: 100 such calls, 12 at a time, peaked at
        # 1.5 GB left open, 0.5 GB closed).
        if hasattr(messages, "aclose"):
            await messages.aclose()
        if request is None:
            raise open_inference.bad("the call brought no ModelInferRequest")
        self.model_name = request.model_name
        return request


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
    async def ModelInfer(self, call: OneMessage, context):
        """Served as a stream of one message (grpc.aio reads a unary call's message before its
        method runs; a stream's when it asks): the call takes twice the most a message may be
        from the body budget before its message is read (while it arrives it is held twice:
        in the transport's buffers and as the message they are parsed into), or is refused
        UNAVAILABLE with its message unread; once read, its own size stays taken."""
        self._authorize(context)
        lease = self.service.body_lease()
        try:
            left = context.time_remaining()
            s = self.service.settings
            await lease.take(2 * s.max_body_bytes, s.request_timeout_s if left is None else left)
            request = await call.read()
            lease.shrink_to(request.ByteSize())
            return await self._model_infer(request, context)
        finally:
            lease.release()

    async def _model_infer(self, request, context):
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
        request.ClearField("raw_input_contents")  # `binary` holds them now: once, not twice
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
    # One input (the usual case) is its contents as they are: no 20 MB copy.
    return req, binary[0] if len(binary) == 1 else b"".join(binary)


def method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated stubs' handlers of the service's methods (taken from what the stubs
    register), ModelInfer's as a stream of one message: see InferenceServicer.ModelInfer."""

    class Capture:
        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, name, handlers) -> None:
            self.handlers = handlers

    async def model_infer(requests, context):  # a coroutine function, as grpc.aio asks
        return await servicer.ModelInfer(OneMessage(requests), context)

    capture = Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    generated = capture.handlers["ModelInfer"]
    return {
        **capture.handlers,
        "ModelInfer": grpc.stream_unary_rpc_method_handler(
            model_infer,
            request_deserializer=generated.request_deserializer,
            response_serializer=generated.response_serializer,
        ),
    }


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
            # No flow-control window grown ahead of what a call has asked to read: with BDP
            # probing the transport took in the messages of calls waiting for body budget
            # anyway (measured: 40 unread 20 MB calls held 359 MB, 41 MB without it).
            ("grpc.http2.bdp_probe", 0),
        ]
    )
    handlers = method_handlers(InferenceServicer(service))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
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
