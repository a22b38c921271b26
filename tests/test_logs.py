"""One log line per request, as JSON (SEGSERVE_LOG_FORMAT=json) or text, carrying the request
id that the response header and error bodies carry too."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import image_bytes, in_process
from segserve.service.telemetry.logs import configure


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def request_lines(text: str) -> list[dict]:
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in entries if e["logger"] == "segserve.request"]


def test_json_logs_have_one_line_per_request_with_its_id_model_and_stages(
    tiny_repository, capsys, restored_logging
):
    configure("json")  # the handler writes to stderr, which capsys holds
    with in_process(tiny_repository) as app:
        ok = app.post(
            "/segment",
            content=image_bytes(32, 48),
            headers={"Content-Type": "image/png", "X-Request-ID": "trace-1"},
        )
        refused = app.post(
            "/segment", content=b"plain text", headers={"Content-Type": "text/plain"}
        )
    assert ok.headers["x-request-id"] == "trace-1"
    lines = {e["request_id"]: e for e in request_lines(capsys.readouterr().err)}

    line = lines["trace-1"]
    assert (line["route"], line["status"], line["model"], line["version"]) == (
        "/segment",
        200,
        "tiny",
        2,
    )
    assert {"decode", "queue", "inference", "total"} <= set(line["stages_ms"])
    assert line["level"] == "info" and line["time"].endswith("Z")

    made = refused.headers["x-request-id"]  # made by the server, in header, body and log
    assert refused.status_code == 415 and refused.json()["request_id"] == made
    assert lines[made]["status"] == 415 and lines[made]["model"] == "tiny"


def test_text_logs_are_one_readable_line_per_request(tiny_repository, capsys, restored_logging):
    configure("text")
    with in_process(tiny_repository) as app:
        app.post(
            "/segment",
            content=image_bytes(32, 48),
            headers={"Content-Type": "image/png", "X-Request-ID": "trace-2"},
        )
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "request_id=trace-2" in x]
    assert "segserve.request: request" in line
    assert "status=200" in line and "model=tiny" in line and "stages_ms=decode:" in line
