"""The FastAPI app: the inference service behind /segment, /models, health, /metrics and v2.

The app holds one `InferenceService` (app.state.service) for its lifespan; the routes are
module-level routers that reach it through FastAPI dependencies.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from segserve import __version__
from segserve.service.core import InferenceService
from segserve.service.errors import install_error_handlers
from segserve.service.middleware import RequestMiddleware
from segserve.service.routes import docs, health, models, page, segment, v2
from segserve.service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    service = InferenceService(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.models.start()
        yield
        # After uvicorn stopped accepting and open requests finished: drain the queues.
        await service.models.stop()

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
    app.add_middleware(
        RequestMiddleware, metrics=service.metrics, timeout_s=service.settings.request_timeout_s,
        closing=lambda: service.models.draining,
    )  # fmt: skip
    install_error_handlers(app)
    for module in (segment, models, health, v2, docs, page):
        app.include_router(module.router)
    return app
