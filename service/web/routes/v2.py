"""The Open Inference Protocol routes: health, metadata and infer, through the same decode,
batcher and rejection counting as /segment."""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from segserve.service.protocols import open_inference
from segserve.service.telemetry.clock import Timings
from segserve.service.web.body import read_capped, wait_for_disconnect
from segserve.service.web.openapi import V2_BODY, V2_RESPONSES, errors
from segserve.service.web.routes.deps import Service, authorize, use_model

probes = APIRouter(prefix="/v2")  # open, as health probes must be
guarded = APIRouter(prefix="/v2", dependencies=[Depends(authorize)])


@probes.get("/health/live")
async def live() -> dict:
    return {"live": True}


@probes.get("/health/ready")
async def ready(service: Service) -> Response:
    ready = service.registry.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@guarded.get("", responses=errors(401))
async def server_metadata() -> dict:
    return open_inference.server_metadata()


@guarded.get("/models/{name}", responses=errors(401, 404, 422))
@guarded.get("/models/{name}/versions/{version}", responses=errors(401, 404, 422))
async def metadata(
    request: Request, service: Service, name: str, version: int | None = None
) -> dict:
    use_model(request, name, version)
    return open_inference.model_metadata(name, service.registry.versions(name))


@guarded.get("/models/{name}/ready", responses=errors(401, 404, 422))
@guarded.get("/models/{name}/versions/{version}/ready", responses=errors(401, 404, 422))
async def model_ready(request: Request, name: str, version: int | None = None) -> Response:
    model = use_model(request, name, version)
    return JSONResponse(
        {"name": name, "ready": model.warmed}, status_code=200 if model.warmed else 503
    )


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
    timings: Timings = request.state.timings  # the middleware's: started on arrival
    s = service.settings
    body = await read_capped(request, s.max_body_bytes, timings.deadline, s.idle_timeout_s)
    header_length = request.headers.get(open_inference.HEADER_LENGTH)
    req, tensor = await asyncio.to_thread(
        open_inference.parse_infer, body, header_length, service.limits
    )
    plan = service.scale_plan(model, req.parameters.scale if req.parameters else None)
    async with service.lease() as lease:
        if isinstance(tensor, np.ndarray):
            images = await service.from_pixels(tensor, model, timings, lease, plan)
        else:
            images = await service.decode(tensor, model, timings, lease, plan)
            open_inference.require_one_size([im.size for im in images])
        labels = await service.segment(
            model, images, timings, partial(wait_for_disconnect, request)
        )
        content, media_type, headers = await service.encode_labels(
            images,
            labels,
            partial(open_inference.infer_response, model.name, model.version, req),
            timings,
        )
    return Response(content, media_type=media_type, headers={**headers, **images[0].headers()})


router = APIRouter()
router.include_router(probes)
router.include_router(guarded)
