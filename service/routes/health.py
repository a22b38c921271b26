"""Liveness, readiness and the Prometheus exposition: open to probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segserve.service.routes.deps import Service, authorize_metrics

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Service) -> JSONResponse:
    """Ready when the default model and every required one is loaded and warm."""
    reason = service.unready_reason()
    if not reason:
        providers = {m.engine.provider for m in service.registry.all()}
        return JSONResponse({"status": "ready", "models": sorted(service.registry.models),
                             "providers": sorted(providers)})  # fmt: skip
    return JSONResponse(
        {"error": "not_ready", "detail": reason}, status_code=503, headers={"Retry-After": "5"}
    )


@router.get("/metrics", dependencies=[Depends(authorize_metrics)])
async def metrics(service: Service) -> Response:
    for m in service.registry.all():
        service.metrics.queue_depth.labels(m.name).set(m.batcher.depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
