"""GET /models, /models/{name}, /models/{name}/palette.png: what is served, for people and tools."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from segserve.service.media.legend import legend_png
from segserve.service.media.tiling import ScalePlan
from segserve.service.runtime.registry import ServedModel
from segserve.service.web.openapi import ModelDetail, ModelListing, errors, png
from segserve.service.web.routes.deps import Service, authorize, use_model

router = APIRouter(dependencies=[Depends(authorize)])


def model_summary(m: ServedModel, versions: list[int], plan: ScalePlan) -> dict:
    card = m.card
    return {
        "name": m.name,
        "version": m.version,
        "versions": versions,
        "architecture": card.architecture,
        "provider": m.engine.provider,
        "ready": m.warmed,
        "classes": [
            {"id": i, "name": n, "color": card.palette[i]} for i, n in enumerate(card.class_names)
        ],
        "input": {
            "mean": card.mean,
            "std": card.std,
            "dtype": card.input_dtype,
            "layout": card.input_layout,
            "size_divisor": card.size_divisor,
        },
        "output": card.output,
        "scale": {
            "policy": card.scale_policy,
            "policies": card.scale_policies,
            "fit_pixels": plan.fit_pixels,
            "tile": plan.tile,
            "halo": plan.halo,
        },
        "variant": m.variant,
        "variants": m.variants,
        "variant_choice": m.choice.as_dict() if m.choice else None,
    }


@router.get("/models", responses=errors(401))
async def list_models(service: Service) -> ModelListing:
    """The models served, the default one, and the versions that failed to load."""
    registry = service.registry
    return {  # type: ignore[return-value]  (validated into ModelListing by FastAPI)
        "default": registry.default_name,
        "models": [
            model_summary(m, registry.versions(m.name), service.scale_plan(m))
            for m in registry.all()
        ],
        "failed": [
            {"name": f.name, "version": f.version, "error": f.error} for f in registry.failed
        ],
    }


@router.get("/models/{name}", responses=errors(401, 404, 422))
async def get_model(
    request: Request,
    service: Service,
    name: str,
    version: int | None = Query(None, ge=1),
) -> ModelDetail:
    """One model (the newest version unless `version`), with its whole card."""
    m = use_model(request, name, version)
    registry = service.registry
    check = registry.gate.check_set(m.name)
    return {
        **model_summary(m, registry.versions(m.name), service.scale_plan(m)),
        "gate": {
            "gated": check is not None,
            "check_set_images": len(check.images) if check is not None else None,
            "tolerance": registry.gate.tolerance,
            "class_floor": m.card.class_floor
            if m.card.class_floor is not None
            else registry.gate.class_floor,
            "pinned": registry.gate.pins.get(m.name),
        },
        "version_states": registry.states(m.name),
        "card": m.card.as_dict(),
    }


@router.get(
    "/models/{name}/palette.png",
    response_class=Response,
    responses={200: png("the legend: each class's colour and name"), **errors(401, 404, 422)},
)
async def palette_png(
    request: Request, name: str, version: int | None = Query(None, ge=1)
) -> Response:
    m = use_model(request, name, version)
    return Response(legend_png(m.card.class_names, m.card.palette), media_type="image/png")
