"""FastAPI's exception handlers: every error an HTTP request meets leaves as the service's
one JSON error body (service/errors.py), and a `ServiceError` that refuses a request is
counted in `segserve_rejected_total`, once, wherever it was raised (/segment, v2, auth)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segserve.service.errors import CODES, ServiceError, error_body


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def error_response(
    request: Request, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(code, detail, request_id_of(request)), status_code=status, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.reason is not None:
            request.app.state.service.metrics.rejected.labels(exc.reason).inc()
        return error_response(request, exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            request,
            exc.status_code,
            CODES.get(exc.status_code, "error"),
            str(exc.detail),
            getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            "{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", ""))
            for e in exc.errors()
        ]
        return error_response(request, 422, "invalid_parameters", "; ".join(parts))
