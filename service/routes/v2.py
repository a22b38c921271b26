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
from segserve.service.core import ServedModel
from segserve.service.errors import ServiceError
from segserve.service.imaging import resize_labels
from segserve.service.routes.deps import (
    Service,
    authorize,
    deadline_of,
    use_model,
    wait_for_disconnect,
)
from segserve.service.schemas import V2_BODY, V2_RESPONSES, errors
from segserve.service.v2 import (
    HEADER_LENGTH,
    InferRequest,
    image_input,
    model_metadata,
    parse_request,
    wants_binary,
)

probes = APIRouter(prefix="/v2")  # open, as health probes must be
guarded = APIRouter(prefix="/v2", dependencies=[Depends(authorize)])


@probes.get("/health/live")
async def live() -> dict:
    return {"live": True}


@probes.get("/health/ready")
async def ready(service: Service) -> Response:
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@guarded.get("", responses=errors(401))
async def server_metadata() -> dict:
    return {"name": "segserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@guarded.get("/models/{name}", responses=errors(401, 404, 422))
@guarded.get("/models/{name}/versions/{version}", responses=errors(401, 404, 422))
async def metadata(
    request: Request, service: Service, name: str, version: int | None = None
) -> dict:
    use_model(request, name, version)
    return model_metadata(name, service.registry.versions(name))


@guarded.get("/models/{name}/ready", responses=errors(401, 404, 422))
@guarded.get("/models/{name}/versions/{version}/ready", responses=errors(401, 404, 422))
async def model_ready(request: Request, name: str, version: int | None = None) -> Response:
    model = use_model(request, name, version)
    return JSONResponse(
        {"name": name, "ready": model.warmed}, status_code=200 if model.warmed else 503
    )


def _response(model: ServedModel, req: InferRequest, labels: list[np.ndarray]) -> Response:
    """The answer, built in a worker thread (a JSON tensor of many labels is megabytes)."""
    stacked = np.stack(labels)
    output: dict = {"name": "labels", "datatype": "UINT8", "shape": list(stacked.shape)}
    response: dict = {
        "model_name": model.name,
        "model_version": str(model.version),
        "outputs": [output],
    }
    if req.id is not None:
        response["id"] = req.id
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


@guarded.post("/models/{name}/infer", responses=V2_RESPONSES, openapi_extra=V2_BODY)
@guarded.post(
    "/models/{name}/versions/{version}/infer", responses=V2_RESPONSES, openapi_extra=V2_BODY
)
async def infer(
    request: Request,
    service: Service,
    name: str,
    version: int | None = None,
) -> Response:
    """Open Inference Protocol infer (tritonclient's HTTP client works unchanged)."""
    model = use_model(request, name, version)
    s = service.settings
    body = await read_capped(request, s.max_body_bytes, deadline_of(request), s.idle_timeout_s)
    req, tensor = await asyncio.to_thread(
        _parse,
        body,
        request.headers.get(HEADER_LENGTH),
        s.max_image_pixels,
        s.max_images_per_request,
    )
    timings: dict[str, float] = {}
    request.state.timings = timings
    deadline = deadline_of(request)
    async with service.lease() as lease:
        if isinstance(tensor, np.ndarray):
            images = await service.from_pixels(tensor, model, timings, lease, deadline)
        else:
            images = await service.decode(tensor, model, timings, lease, deadline)
            if len({im.size for im in images}) > 1:
                raise ServiceError(
                    400,
                    "the images of one request must share one size (output is [N, H, W])",
                    reason="bad_request",
                )
        labels = await service.segment(
            model, images, deadline, timings, partial(wait_for_disconnect, request)
        )
        full = await asyncio.to_thread(
            lambda: [resize_labels(lab, *im.size) for lab, im in zip(labels, images, strict=True)]
        )
        return await asyncio.to_thread(_response, model, req, full)


def _parse(body: bytes, header_length: str | None, max_pixels: int, max_images: int):
    req, binary = parse_request(body, header_length)
    return req, image_input(req, binary, max_pixels, max_images)


router = APIRouter()
router.include_router(probes)
router.include_router(guarded)
