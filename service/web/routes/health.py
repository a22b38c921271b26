"""Liveness, readiness and the Prometheus exposition: open to probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from segserve.service.errors import NOT_READY, error_body
from segserve.service.web.handlers import request_id_of
from segserve.service.web.openapi import METRICS_RESPONSE, ErrorBody, Live, Ready
from segserve.service.web.routes.deps import Service, authorize_metrics

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Live:
    """Liveness: the process answers (it never waits for models or the queue)."""
    return Live()


@router.get(
    "/readyz",
    responses={200: {"model": Ready}, 503: {"model": ErrorBody, "description": "not ready"}},
)
async def readyz(request: Request, service: Service) -> JSONResponse:
    """Ready when the default model and every required one is loaded and warm."""
    reason = service.registry.unready_reason()
    if not reason:
        providers = {m.engine.provider for m in service.registry.all()}
        return JSONResponse(
            {"status": "ready", "models": service.registry.names, "providers": sorted(providers)}
        )
    return JSONResponse(
        error_body(NOT_READY, reason, request_id_of(request)),
        status_code=503,
        headers={"Retry-After": "5"},
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
