"""Every error of an HTTP request leaves as JSON {"error", "detail", "request_id"}, on a bare app: our own
ServiceError (counted under its rejection reason), Starlette's HTTP errors, and FastAPI's
parameter validation."""

import asyncio

import httpx
from fastapi import FastAPI
from prometheus_client import generate_latest

from segserve.service.errors import ServiceError
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.web.handlers import install_error_handlers


def app_with_errors() -> tuple[FastAPI, ServiceMetrics]:
    app = FastAPI()
    metrics = ServiceMetrics()

    class State:  # what the handlers reach: app.state.service.metrics
        pass

    app.state.service = State()
    app.state.service.metrics = metrics
    install_error_handlers(app)

    @app.get("/refuse")
    async def refuse() -> None:
        raise ServiceError(503, "busy", reason="queue_full", headers={"Retry-After": "2"})

    @app.get("/typed/{n}")
    async def typed(n: int) -> dict:
        return {"n": n}

    return app, metrics


def get(app, path: str) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(main())


def test_a_service_error_is_json_with_its_headers_and_counts_its_reason():
    app, metrics = app_with_errors()
    r = get(app, "/refuse")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json() == {"error": "unavailable", "detail": "busy"}
    text = generate_latest(metrics.registry).decode()
    assert 'segserve_rejected_total{reason="queue_full"} 1.0' in text


def test_unknown_routes_and_bad_parameters_are_json_too():
    app, _ = app_with_errors()
    missing = get(app, "/nowhere")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = get(app, "/typed/seven")
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_parameters"
    assert "path.n" in bad.json()["detail"]
