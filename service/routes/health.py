"""Liveness, readiness and the Prometheus exposition: open to probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segserve.service.routes.deps import Service

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Service) -> JSONResponse:
    if service.ready:
        return JSONResponse({"status": "ready", "models": sorted(service.registry.models)})
    failed = [f"{f.name}/{f.version}: {f.error}" for f in service.registry.failed]
    detail = (
        "models failed to load: " + "; ".join(failed)
        if failed
        else "models are loading or warming up"
    )
    return JSONResponse(
        {"error": "not_ready", "detail": detail}, status_code=503, headers={"Retry-After": "5"}
    )


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    for m in service.registry.all():
        service.metrics.queue_depth.labels(m.name).set(m.batcher.depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
