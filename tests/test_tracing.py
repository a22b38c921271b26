"""OpenTelemetry traces (telemetry/tracing.py), end to end against an OTLP receiver built
here on opentelemetry-proto (no collector runs on this machine): `segserve serve` started
with the standard OTEL_* variables, a client's traceparent over HTTP and over gRPC. The
client's trace id survives into every span; stage spans nest under the request's; the batch
span links each request it served. Off, the server makes no exporter and imports no SDK."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from helpers import ROOT, OtlpReceiver, image_bytes, spans_of, wait_for
from segserve.default_model import NAME
from segserve.service.telemetry.tracing import Tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def traced(grpc_traced_server):
    """The session's traced server (conftest.py), which also serves the gRPC tests."""
    return grpc_traced_server


def auth(server) -> dict[str, str]:
    return {"authorization": f"Bearer {server.key}"}


def post_traced(client, server, trace: str, image: bytes):
    """POST /segment with a PNG under the client span `CLIENT_SPAN` of `trace`."""
    return client.post(
        "/segment",
        content=image,
        headers={
            "Content-Type": "image/png",
            "traceparent": f"00-{trace}-{CLIENT_SPAN}-01",
            **auth(server),
        },
    )


def check_trace(trace: str, request_name: str, stages_needed: set[str]) -> None:
    # The request's span ends after its answer has gone out, so it can reach the receiver in
    # a later export than the batch span: wait for both.
    wait_for(
        lambda: any(s.name == "batch" for s in OtlpReceiver.spans if any(
            link.trace_id.hex() == trace for link in s.links))
        and any(s.name == request_name for s in spans_of(trace)),
        20, "the batch span and the request's span",
    )  # fmt: skip
    spans = spans_of(trace)
    (request,) = [s for s in spans if s.name == request_name]
    assert request.parent_span_id.hex() == CLIENT_SPAN  # the client's span is its parent
    stages = {s.name: s for s in spans if s.parent_span_id == request.span_id}
    assert stages_needed <= set(stages), sorted(stages)
    for stage in stages.values():
        assert request.start_time_unix_nano <= stage.start_time_unix_nano
        assert stage.end_time_unix_nano <= request.end_time_unix_nano
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["segserve.model"].string_value == NAME
    assert attributes["segserve.tiles"].int_value == 1
    (batch,) = [
        s for s in OtlpReceiver.spans
        if s.name == "batch" and any(link.span_id == request.span_id for link in s.links)
    ]  # fmt: skip
    (link,) = [link for link in batch.links if link.span_id == request.span_id]
    assert link.trace_id.hex() == trace


def test_an_http_request_is_traced_under_the_client_s_traceparent(traced):
    trace = TRACE
    with traced.client() as c:
        r = post_traced(c, traced, trace, image_bytes(64, 80))
    assert r.status_code == 200 and r.headers["x-trace-id"] == trace
    check_trace(trace, "POST /segment", {"decode", "queue", "inference", "encode"})
    assert trace in traced.log_text()  # the request's log line names its trace


def test_a_grpc_request_is_traced_under_the_client_s_traceparent(traced):
    trace = "0af7651916cd43dd8448eb211c80319c"
    client = grpcclient.InferenceServerClient(traced.grpc)
    image = grpcclient.InferInput("image", [1, 48, 64, 3], "UINT8")
    image.set_data_from_numpy(np.zeros((1, 48, 64, 3), np.uint8))
    client.infer(
        NAME, [image], headers={"traceparent": f"00-{trace}-{CLIENT_SPAN}-01", **auth(traced)}
    )
    # raw pixels: no decode
    check_trace(trace, "/inference.GRPCInferenceService/ModelInfer", {"queue", "inference"})


def test_health_checks_and_scrapes_are_not_traced(traced):
    with traced.client() as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            r = c.get(
                path, headers={"traceparent": f"00-{'1' * 32}-{CLIENT_SPAN}-01", **auth(traced)}
            )
            assert r.status_code == 200, path
        # then a traced request: spans go out in the order they end, so once its span is in,
        # a probe's would have been too
        after = "2" * 32
        assert post_traced(c, traced, after, image_bytes(16, 16)).status_code == 200
    wait_for(lambda: any(s.name == "POST /segment" for s in spans_of(after)), 20, "a later span")
    assert spans_of("1" * 32) == []


def test_without_otel_variables_tracing_is_off_and_no_sdk_is_imported():
    assert not Tracing.from_env({}).enabled
    assert not Tracing.from_env({"OTEL_TRACES_EXPORTER": "none"}).enabled
    with pytest.raises(ValueError, match="http/protobuf"):
        Tracing.from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    code = (
        "import sys; from segserve.service.app import create_app; app = create_app(); "
        "print(app.state.service.tracing.enabled, 'opentelemetry.sdk' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stdout.split() == ["False", "False"], out.stderr
