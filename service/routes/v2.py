"""The Open Inference Protocol routes: health, metadata and infer, through the same decode,
batcher and rejection counting as /segment."""

from __future__ import annotations

import asyncio
import json
from functools import partial

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from segserve.service.body import read_capped
from segserve.service.core import DecodedImage, InferenceService, ServedModel
from segserve.service.errors import ServiceError
from segserve.service.routes.deps import (
    Service,
    authorize,
    deadline_of,
    use_model,
    wait_for_disconnect,
)
from segserve.service.v2 import HEADER_LENGTH, image_input, model_metadata, split_body, wants_binary

probes = APIRouter(prefix="/v2")  # open, as health probes must be
guarded = APIRouter(prefix="/v2", dependencies=[Depends(authorize)])


@probes.get("/health/live")
async def live() -> dict:
    return {"live": True}


@probes.get("/health/ready")
async def ready(service: Service) -> Response:
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@guarded.get("")
async def server_metadata() -> dict:
    return {"name": "segserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@guarded.get("/models/{name}")
@guarded.get("/models/{name}/versions/{version}")
async def metadata(
    request: Request, service: Service, name: str, version: int | None = None
) -> dict:
    use_model(request, name, version)
    return model_metadata(name, service.registry.versions(name))


@guarded.get("/models/{name}/ready")
@guarded.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: int | None = None) -> Response:
    model = use_model(request, name, version)
    return JSONResponse(
        {"name": name, "ready": model.warmed}, status_code=200 if model.warmed else 503
    )


def _images(
    service: InferenceService, model: ServedModel, body: bytes, header_length: str | None
) -> tuple[dict, list[DecodedImage], dict[str, float]]:
    """Parse, decode and prepare every image of one request, in one worker thread."""
    req, binary = split_body(body, header_length)
    tensor = image_input(req, binary, service.settings.max_image_pixels)
    timings: dict[str, float] = {}
    if isinstance(tensor, np.ndarray):
        return req, [service.accept_pixels(im, model, timings) for im in tensor], timings
    images = [service.decode_sync(blob, model, timings) for blob in tensor]
    if len({im.size for im in images}) > 1:
        raise ServiceError(
            400,
            "the images of one request must share one size (output is [N, H, W])",
            reason="bad_request",
        )
    return req, images, timings


def _response(model: ServedModel, req: dict, labels: list[np.ndarray]) -> Response:
    stacked = np.stack(labels)
    output: dict = {"name": "labels", "datatype": "UINT8", "shape": list(stacked.shape)}
    response: dict = {
        "model_name": model.name,
        "model_version": str(model.version),
        "outputs": [output],
    }
    if "id" in req:
        response["id"] = req["id"]
    if wants_binary(req):
        data = stacked.tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps(response).encode()
        return Response(
            header + data,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    output["data"] = stacked.ravel().tolist()
    return JSONResponse(response)


@guarded.post("/models/{name}/infer")
@guarded.post("/models/{name}/versions/{version}/infer")
async def infer(
    request: Request,
    service: Service,
    name: str,
    version: int | None = None,
) -> Response:
    model = use_model(request, name, version)
    body = await read_capped(request, service.settings.max_body_bytes)
    req, images, timings = await asyncio.to_thread(
        _images, service, model, body, request.headers.get(HEADER_LENGTH)
    )
    request.state.timings = timings
    labels = await service.segment(
        model, images, deadline_of(request), timings, partial(wait_for_disconnect, request)
    )
    return await asyncio.to_thread(_response, model, req, labels)


router = APIRouter()
router.include_router(probes)
router.include_router(guarded)
