"""Liveness, readiness and the Prometheus exposition: open to probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segserve.service.routes.deps import Service, authorize_metrics
from segserve.service.schemas import METRICS_RESPONSE, ErrorBody, Live, Ready

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Live:
    """Liveness: the process answers (it never waits for models or the queue)."""
    return Live()


@router.get(
    "/readyz",
    responses={200: {"model": Ready}, 503: {"model": ErrorBody, "description": "not ready"}},
)
async def readyz(service: Service) -> JSONResponse:
    """Ready when the default model and every required one is loaded and warm."""
    reason = service.models.unready_reason()
    if not reason:
        providers = {m.engine.provider for m in service.models.all()}
        return JSONResponse({"status": "ready", "models": service.models.names,
                             "providers": sorted(providers)})  # fmt: skip
    return JSONResponse(
        {"error": "not_ready", "detail": reason}, status_code=503, headers={"Retry-After": "5"}
    )


@router.get(
    "/metrics",
    dependencies=[Depends(authorize_metrics)],
    response_class=Response,
    responses=METRICS_RESPONSE,
)
async def metrics(service: Service) -> Response:
    """Prometheus metrics (open, or behind the API key or metrics token: see settings)."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
