"""FastAPI dependencies: the service, the API key, the model a request names."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from segserve.service.core import InferenceService
from segserve.service.errors import ServiceError
from segserve.service.registry import ServedModel

# Dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a thread
# hop per dependency per request (measured: 7 % of the server's CPU, docs/benchmarks.md).


def service_of(request: Request) -> InferenceService:
    return request.app.state.service


async def get_service(request: Request) -> InferenceService:
    return service_of(request)


Service = Annotated[InferenceService, Depends(get_service)]


def bearer_matches(request: Request, *keys: str | None) -> bool:
    """`Authorization: Bearer T` with T one of `keys` (compared in constant time)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(
        k is not None and hmac.compare_digest(token.encode(), k.encode()) for k in keys
    )


def unauthorized(what: str) -> ServiceError:
    return ServiceError(
        401, f"missing or wrong {what}: send Authorization: Bearer KEY",
        reason="unauthorized", headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


async def authorize(request: Request) -> None:
    """With an API key set: `Authorization: Bearer KEY` or 401."""
    key = service_of(request).settings.api_key
    if key is not None and not bearer_matches(request, key):
        raise unauthorized("API key")


async def authorize_metrics(request: Request) -> None:
    """With an API key set and metrics not public: the key or the metrics token."""
    s = service_of(request).settings
    open_ = s.api_key is None or s.public_metrics
    if not open_ and not bearer_matches(request, s.api_key, s.metrics_token):
        raise unauthorized("API key or metrics token")


async def authorize_docs(request: Request) -> None:
    """With an API key set and docs not public: the key, for the API description."""
    s = service_of(request).settings
    if s.api_key is not None and not s.public_docs and not bearer_matches(request, s.api_key):
        raise unauthorized("API key (or set SEGSERVE_PUBLIC_DOCS=true)")


def use_model(request: Request, name: str | None, version: int | None) -> ServedModel:
    """Resolve the model and note it in request state: from here on, the response headers
    and the request metrics name it."""
    model = service_of(request).model(name, version)
    request.state.model, request.state.version = model.name, model.version
    return model


def deadline_of(request: Request) -> float:
    """The request's deadline on time.monotonic(): its timeout counts from its arrival."""
    return request.state.arrived + service_of(request).settings.request_timeout_s


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
