"""Every error leaves as JSON {"error": CODE, "detail": TEXT} with the status DESIGN.md gives."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
         415: "unsupported_media_type", 422: "invalid_parameters", 500: "internal_error", 503: "unavailable", 504: "deadline_exceeded"}  # fmt: skip


class ServiceError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.detail = detail
        self.headers = headers or {}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
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
        return error_response(422, "invalid_parameters", "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"{exc.__class__.__name__}: {exc}")
