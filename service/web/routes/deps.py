"""FastAPI dependencies: the service, the API key, the model a request names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from segserve.service.auth import bearer_token, token_matches
from segserve.service.errors import ServiceError
from segserve.service.pipeline import InferenceService
from segserve.service.runtime.registry import ServedModel

# Dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a thread
# hop per dependency per request (measured: 7 % of the server's CPU, docs/benchmarks.md).


def service_of(request: Request) -> InferenceService:
    return request.app.state.service


async def get_service(request: Request) -> InferenceService:
    return service_of(request)


Service = Annotated[InferenceService, Depends(get_service)]


# The schemes, as the API description states them (routes/docs.py keeps them only where
# the settings make them needed); auto_error off: a missing key is our own 401 below.
API_KEY = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="the server's API key (SEGSERVE_API_KEY)"
)
METRICS_KEY = HTTPBearer(
    auto_error=False,
    scheme_name="metricsKey",
    description="the API key or the metrics token (SEGSERVE_METRICS_TOKEN)",
)
Bearer = HTTPAuthorizationCredentials | None


def bearer_matches(credentials: Bearer, *keys: str | None) -> bool:
    """`Authorization: Bearer T` with T one of `keys` (compared in constant time)."""
    return token_matches(credentials.credentials if credentials else None, *keys)


def unauthorized(what: str) -> ServiceError:
    return ServiceError(
        401,
        f"missing or wrong {what}: send Authorization: Bearer KEY",
        reason="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def authorize(request: Request, credentials: Annotated[Bearer, Security(API_KEY)]) -> None:
    """With an API key set: `Authorization: Bearer KEY` or 401."""
    key = service_of(request).settings.api_key
    if key is not None and not bearer_matches(credentials, key):
        raise unauthorized("API key")


async def authorize_metrics(
    request: Request, credentials: Annotated[Bearer, Security(METRICS_KEY)]
) -> None:
    """With an API key set and metrics not public: the key or the metrics token."""
    s = service_of(request).settings
    open_ = s.api_key is None or s.public_metrics
    if not open_ and not bearer_matches(credentials, s.api_key, s.metrics_token):
        raise unauthorized("API key or metrics token")


async def authorize_docs(request: Request) -> None:
    """With an API key set and docs not public: the key, for the API description."""
    s = service_of(request).settings
    if (
        s.api_key is not None
        and not s.public_docs
        and not token_matches(bearer_token(request.headers.get("authorization")), s.api_key)
    ):
        raise unauthorized("API key (or set SEGSERVE_PUBLIC_DOCS=true)")


def use_model(request: Request, name: str | None, version: int | None) -> ServedModel:
    """Resolve the model and note it in request state: from here on, the response headers
    and the request metrics name it."""
    model = service_of(request).registry.get(name, version)
    request.state.model, request.state.version = model.name, model.version
    return model
