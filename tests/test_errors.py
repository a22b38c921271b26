"""The one error: a status, a short code, a sentence; one JSON body whoever writes it."""

import json

from segserve.service.errors import CODES, NOT_READY, ServiceError, error_body, error_json


def test_error_codes_are_short_names_and_bodies_carry_the_request_id():
    assert CODES[413] == "too_large" and CODES[504] == "deadline_exceeded"
    assert ServiceError(418, "teapot").code == "error"  # a status without a name of its own
    assert error_body("bad_request", "no", "id-1") == {
        "error": "bad_request",
        "detail": "no",
        "request_id": "id-1",
    }
    assert "request_id" not in error_body("bad_request", "no", None)


def test_the_bytes_on_the_wire_are_the_same_body():
    assert json.loads(error_json("too_large", "big", "r1")) == error_body("too_large", "big", "r1")
    assert ServiceError(503, "warming", code=NOT_READY).code == "not_ready"
