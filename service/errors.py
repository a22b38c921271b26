"""Every error leaves as JSON {"error": CODE, "detail": TEXT, "request_id": ID}.

A `ServiceError` carries its HTTP status and, when it refuses a request, the reason it is
counted under in `segserve_rejected_total`: the handler counts it, once, wherever it was
raised (/segment, v2, auth).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         408: "request_timeout", 413: "too_large", 415: "unsupported_media_type",
         422: "invalid_parameters", 431: "headers_too_large", 499: "client_closed",
         500: "internal_error", 503: "unavailable", 504: "deadline_exceeded"}  # fmt: skip


class ServiceError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        reason: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason  # the rejected_total label, or None for errors not counted there
        self.code = code or CODES.get(status, "error")
        self.headers = headers or {}


def error_body(code: str, detail: str, request_id: str | None) -> dict:
    body = {"error": code, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    return body


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
