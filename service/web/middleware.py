"""One ASGI middleware around every request: its id, its clock (`Timings`: arrival, deadline,
stages), the request and stage metrics, its log line, and the last resort for an unexpected
exception.

The model a request reached travels in request state (`scope["state"]["model"]`), set by the
route that resolved it; the route label is the matched route's path template. An unexpected
exception becomes a JSON 500 here, inside Starlette's ServerErrorMiddleware, so that it never
re-raises to uvicorn, which would drop the keep-alive connection.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segserve.service.errors import error_json
from segserve.service.intake import BodyLease
from segserve.service.telemetry.clock import Timings
from segserve.service.telemetry.logs import FIELDS
from segserve.service.telemetry.prometheus import ServiceMetrics
from segserve.service.telemetry.tracing import Tracing

log = logging.getLogger("segserve.request")

# Probes and scrapes come every few seconds; their lines would drown the requests' (errors
# are still logged).
QUIET_ROUTES = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
# A client's X-Request-ID is kept when it is short and printable; otherwise a new one is made.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        timeout_s: float = float("inf"),
        closing: Callable[[], bool] = lambda: False,
        tracing: Tracing | None = None,
    ) -> None:
        self.app, self.metrics, self.timeout_s = app, metrics, timeout_s
        self.tracing = tracing or Tracing()
        # True while the server drains for shutdown: each response closes its connection,
        # so no client holds a keep-alive connection to a replica about to stop listening.
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        timings = Timings(self.timeout_s)  # the request's deadline counts from here
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, timings=timings)
        status, started = 500, False
        span = None
        if self.tracing.enabled and scope["path"] not in QUIET_ROUTES:  # probes: no traces
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            span = self.tracing.start_request(
                f"{scope['method']} {scope['path']}",
                carrier,
                timings,
                **{"http.request.method": scope["method"], "segserve.request_id": request_id},
            )

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if span is not None:
                    headers.append((b"x-trace-id", self.tracing.trace_id(span).encode()))
                if self.closing():
                    headers.append((b"connection", b"close"))
                if "model" in state:
                    headers.append((b"x-model", state["model"].encode()))
                    headers.append((b"x-model-version", str(state["version"]).encode()))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # the last resort: nothing may reach uvicorn
            log.exception("request %s failed: %s", request_id, exc)
            if not started:
                body = error_json("internal_error", f"{type(exc).__name__}: {exc}", request_id)
                await send_wrapper(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            self.metrics.inflight.dec()
            seconds = timings.elapsed()
            route = route_label(scope)
            model = state.get("model", "")
            if route != "/metrics":
                self.metrics.requests.labels(model, route, str(status)).inc()
                self.metrics.request_duration.labels(model, route).observe(seconds)
            if model:
                self.metrics.observe_stages(timings, model)
            if route not in QUIET_ROUTES or status >= 400:
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "model": model,
                    "version": state.get("version", ""),
                    "ms": round(seconds * 1000, 2),
                }
                if timings.seconds:
                    fields["stages_ms"] = timings.milliseconds()
                if span is not None:
                    fields["trace_id"] = self.tracing.trace_id(span)
                log.info("request", extra={FIELDS: fields})
            if span is not None:
                span.update_name(f"{scope['method']} {route}")
                self.tracing.end_request(
                    span,
                    timings,
                    **{
                        "http.route": route,
                        "http.response.status_code": status,
                        "segserve.model": model,
                        "segserve.version": str(state.get("version", "")),
                        "segserve.request_id": request_id,
                        **timings.notes,
                    },
                )


class BodyLeases:
    """Each HTTP request's share of the body budget (service/intake.py) is in its state while
    it runs (web/body.py takes from it before reading) and is given back once its answer is
    sent. A request refused for want of room closes its connection: what its client goes on
    sending is never read."""

    def __init__(self, app: ASGIApp, lease: Callable[[], BodyLease]) -> None:
        self.app, self.lease = app, lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lease = self.lease()
        scope.setdefault("state", {})["body_lease"] = lease

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and lease.refused:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            lease.release()
