"""The FastAPI app: the request pipeline behind /segment, /models, health, /metrics and v2.

The app holds one `InferenceService` (app.state.service) for its lifespan; the routes are
module-level routers that reach it through FastAPI dependencies.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from segserve import __version__
from segserve.service.pipeline import InferenceService
from segserve.service.settings import Settings
from segserve.service.telemetry.tracing import Tracing
from segserve.service.web.handlers import install_error_handlers
from segserve.service.web.middleware import BodyLeases, RequestMiddleware
from segserve.service.web.routes import catalog, docs, health, page, segment, v2


def create_app(settings: Settings | None = None, grpc_host: str = "127.0.0.1") -> FastAPI:
    # OpenTelemetry from its standard environment variables; off (and free) when unset.
    tracing = Tracing.from_env()
    service = InferenceService(settings or Settings(), tracing=tracing)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.registry.start()
        grpc = None
        if service.settings.grpc_port is not None:  # the same pipeline over gRPC, beside
            try:
                from segserve.service.protocols import grpc_server
            except ImportError as exc:
                raise RuntimeError(
                    f"grpc_port is set but gRPC is not installed ({exc}): "
                    "pip install 'segserve[grpc]'"
                ) from exc

            grpc = await grpc_server.start(service, grpc_host, service.settings.grpc_port)
            app.state.grpc_port = grpc[2]
        yield
        # After uvicorn stopped accepting and open requests finished: drain the queues.
        if grpc is not None:
            await grpc_server.stop(*grpc[:2])
        await service.shadow.stop()
        await service.registry.stop()
        tracing.shutdown()

    app = FastAPI(
        title="segserve",
        version=__version__,
        description="Semantic segmentation as a service.",
        lifespan=lifespan,
        docs_url=None,  # routes/docs.py: offline assets, the spec behind the API key
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    # Added first, so it runs inside RequestMiddleware (whose clock and id it uses).
    app.add_middleware(BodyLeases, lease=service.body_lease)
    app.add_middleware(
        RequestMiddleware,
        metrics=service.metrics,
        timeout_s=service.settings.request_timeout_s,
        closing=lambda: service.registry.draining,
        tracing=tracing,
    )
    install_error_handlers(app)
    for module in (segment, catalog, health, v2, docs, page):
        app.include_router(module.router)
    return app
