"""The request middleware on a bare app: ids, route labels, the request's clock and stages,
the last-resort 500."""

import httpx
from fastapi import FastAPI, Request
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segserve.service.telemetry.clock import Stage, Timings
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.web.middleware import RequestMiddleware


def make_app() -> tuple[FastAPI, ServiceMetrics]:
    metrics = ServiceMetrics()
    app = FastAPI()
    app.add_middleware(RequestMiddleware, metrics=metrics, timeout_s=7.0)

    @app.get("/items/{name}")
    async def item(request: Request, name: str) -> dict:
        request.state.model, request.state.version = "m", 3
        if name == "boom":
            raise ZeroDivisionError("the route fell over")
        timings: Timings = request.state.timings
        timings.add(Stage.DECODE, 0.002)
        return {"name": name, "deadline_in": timings.deadline - timings.arrived}

    return app, metrics


def call(app, *requests):
    import asyncio

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(main())


def samples(metrics: ServiceMetrics, name: str) -> list:
    text = generate_latest(metrics.registry).decode()
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_an_unexpected_exception_is_a_json_500_naming_the_request_and_model():
    app, metrics = make_app()
    (r,) = call(app, ("/items/boom", {"X-Request-ID": "req-7"}))
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal_error",
        "detail": "ZeroDivisionError: the route fell over",
        "request_id": "req-7",
    }
    assert r.headers["x-model"] == "m" and r.headers["x-model-version"] == "3"
    (sample,) = samples(metrics, "segserve_requests_total")
    assert sample.labels == {"model": "m", "route": "/items/{name}", "status": "500"}


def test_route_labels_are_templates_and_unmatched_paths_share_one_label():
    app, metrics = make_app()
    call(app, ("/items/a", {}), ("/items/b", {}), ("/nowhere/1", {}), ("/nowhere/2", {}))
    labels = {(s.labels["route"], s.value) for s in samples(metrics, "segserve_requests_total")}
    assert labels == {("/items/{name}", 2.0), ("unmatched", 2.0)}


def test_request_ids_are_made_or_kept_when_they_are_safe():
    app, _ = make_app()
    made, kept, unsafe = call(
        app,
        ("/items/a", {}),
        ("/items/a", {"X-Request-ID": "abc"}),
        ("/items/a", {"X-Request-ID": "a b\x7f" + "x" * 200}),
    )
    assert len(made.headers["x-request-id"]) == 32 and kept.headers["x-request-id"] == "abc"
    assert unsafe.headers["x-request-id"] != "a b\x7f" + "x" * 200


def test_each_request_has_one_clock_whose_stages_feed_the_stage_metric():
    app, metrics = make_app()
    (r,) = call(app, ("/items/a", {}))
    assert r.json()["deadline_in"] == 7.0  # the deadline counts from arrival
    (sample,) = [
        s
        for s in samples(metrics, "segserve_stage_duration_seconds_count")
        if s.labels == {"model": "m", "stage": "decode"}
    ]
    assert sample.value == 1.0
