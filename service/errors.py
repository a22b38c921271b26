"""The one way a refusal leaves the service: a `ServiceError` with its status, a short code,
a sentence for a person and, when it refuses a request, the reason it is counted under in
`segserve_rejected_total`; on the wire, one JSON body `{"error": CODE, "detail": TEXT,
"request_id": ID}` (`error_body`), whichever front end or layer wrote it.

Pure: no web framework here. The HTTP handlers (web/handlers.py) and the gRPC front end map
it onto their own status codes.
"""

from __future__ import annotations

import json

CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    431: "headers_too_large",
    499: "client_closed",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
}
# A 503 for the service or a model not being ready (starting, warming, draining): /readyz,
# v2 readiness and a request that reaches a model still warming say it with this code.
NOT_READY = "not_ready"


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


def error_body(code: str, detail: str, request_id: str | None = None) -> dict:
    body = {"error": code, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    return body


def error_json(code: str, detail: str, request_id: str | None = None) -> bytes:
    """`error_body` as the bytes an answer carries."""
    return json.dumps(error_body(code, detail, request_id)).encode()
