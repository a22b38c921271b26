"""POST /segment: one image in, its labels out as a PNG, an overlay or JSON."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from segserve.service.errors import ServiceError
from segserve.service.media.render import MaskSpecError, RenderSpec, parse_masks
from segserve.service.telemetry.clock import Timings
from segserve.service.web.body import image_bytes, wait_for_disconnect
from segserve.service.web.openapi import IMAGE_BODY, SEGMENT_RESPONSES
from segserve.service.web.routes.deps import Service, authorize, use_model

router = APIRouter(dependencies=[Depends(authorize)])


class SegmentParams(BaseModel):
    """The query of POST /segment (one model validates it: 5 Query() parameters cost FastAPI
    about a millisecond of CPU per request, measured)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="model name; default: the server's default")
    version: int | None = Field(None, ge=1, description="model version; default: the newest")
    format: Literal["png", "json", "overlay"] = Field(
        "png", description="png: the label PNG; overlay: the image with class colours; json"
    )
    masks: str = Field(
        "none", description="none | all | comma-separated class names or ids (format=json)"
    )
    mask_encoding: Literal["png", "rle"] = Field(
        "png", description="masks as 1-bit PNGs or COCO RLE"
    )
    scale: Literal["native", "fit"] | None = Field(
        None,
        description="native: the network sees the image at its own resolution, in "
        "overlapping tiles past one tile; fit: scaled down to the model's working size first. "
        "Default: the model's (GET /models/{name}: scale.policy)",
    )


@router.post(
    "/segment",
    summary="Segment one image",
    response_class=Response,
    responses=SEGMENT_RESPONSES,
    openapi_extra=IMAGE_BODY,
)
async def segment(
    request: Request, service: Service, params: Annotated[SegmentParams, Query()]
) -> Response:
    """The image's labels: a label PNG (one palette index per pixel, the model's colours),
    the image with its classes overlaid, or JSON with the classes present, their shares,
    the label PNG and, on request, a mask per class. Always at the image's own size. How
    the network saw it is in the answer: `X-Scale` (native or fit), `X-Inference-Size`
    (WxH it ran at), `X-Tiles` (1: whole), and `inference` in JSON."""
    served = use_model(request, params.model, params.version)
    try:
        mask_ids = parse_masks(params.masks, served.card)
    except MaskSpecError as exc:
        raise ServiceError(422, str(exc)) from exc
    if mask_ids and params.format != "json":
        raise ServiceError(422, "masks come with format=json")
    plan = service.scale_plan(served, params.scale)
    timings: Timings = request.state.timings  # the middleware's: started on arrival
    s = service.settings
    data = await image_bytes(request, s.max_body_bytes, timings.deadline, s.idle_timeout_s)
    spec = RenderSpec(params.format, tuple(mask_ids), params.mask_encoding)
    async with service.lease() as lease:
        (image,) = await service.decode([data], served, timings, lease, plan)
        (labels,) = await service.segment(
            served, [image], timings, partial(wait_for_disconnect, request)
        )
        body, media_type = await service.render(served, image, labels, spec, timings)
    headers = {"Server-Timing": timings.server_timing(), **image.headers()}
    return Response(body, media_type=media_type, headers=headers)
