"""The Open Inference Protocol over gRPC (service/protocols/grpc_server.py), driven by
tritonclient.grpc unchanged against `segserve serve --grpc-port`: metadata, readiness and
infer on the default model, labels byte-identical to the same request over HTTP v2; each
kind of bad request gets its status code; grpc.health.v1 answers; the committed stubs are
what grpcio-tools makes of the .proto."""

import filecmp

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers import ROOT, image_bytes, metric_samples
from segserve.default_model import NAME
from segserve.service.protocols import grpc_stubs

KEY = "grpc-key"
# Passed as copies: tritonclient.http adds its own headers into the dict it is given.
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def server(grpc_traced_server):
    """The session's gRPC server (conftest.py: also traced, which must change no answer)."""
    assert grpc_traced_server.key == KEY
    return grpc_traced_server


def pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, h, w, 3), np.uint8)


def infer(client, array: np.ndarray, model: str = NAME, **kw):
    image = grpcclient.InferInput("image", list(array.shape), "UINT8")
    image.set_data_from_numpy(array)
    return client.infer(model, [image], headers=dict(AUTH), **kw)


def test_tritonclient_grpc_reads_metadata_and_readiness(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME, headers=dict(AUTH))
    meta = client.get_server_metadata(headers=dict(AUTH))
    assert meta.name == "segserve" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata(NAME, headers=dict(AUTH))
    assert model.versions == ["1"] and model.inputs[0].name == "image"
    assert list(model.inputs[0].shape) == [-1, -1, -1, 3] and model.outputs[0].datatype == "UINT8"


def test_labels_over_grpc_are_byte_identical_to_http_v2(server):
    array = pixels(96, 128, seed=3)
    over_grpc = infer(grpcclient.InferenceServerClient(server.grpc), array)
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    image = httpclient.InferInput("image", list(array.shape), "UINT8")
    image.set_data_from_numpy(array, binary_data=True)
    over_http = http.infer(NAME, [image], headers=dict(AUTH))
    labels = over_grpc.as_numpy("labels")
    assert labels.shape == (1, 96, 128) and labels.dtype == np.uint8
    assert labels.tobytes() == over_http.as_numpy("labels").tobytes()
    assert over_grpc.get_response().model_version == "1"


def test_encoded_images_go_as_bytes_and_a_bad_one_is_invalid_argument(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    blobs = np.array([image_bytes(40, 60, "JPEG")], dtype=np.object_)
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(blobs)
    answer = client.infer(NAME, [image], headers=dict(AUTH))
    assert answer.as_numpy("labels").shape == (1, 40, 60)
    image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as bad:
        client.infer(NAME, [image], headers=dict(AUTH))
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "case, status",
    [
        ("no key", "UNAUTHENTICATED"),
        ("unknown model", "NOT_FOUND"),
        ("over the body limit", "RESOURCE_EXHAUSTED"),
        ("over the pixel limit", "RESOURCE_EXHAUSTED"),
        ("not RGB", "INVALID_ARGUMENT"),
        ("images of two sizes", "INVALID_ARGUMENT"),
    ],
)
def test_each_bad_request_gets_its_status_code(server, case, status):
    client = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(InferenceServerException) as refused:
        if case == "no key":
            image = grpcclient.InferInput("image", [1, 8, 8, 3], "UINT8")
            image.set_data_from_numpy(pixels(8, 8))
            client.infer(NAME, [image])
        elif case == "unknown model":
            infer(client, pixels(8, 8), model="nope")
        elif case == "over the body limit":  # 2.4 MB > max_body_bytes (2 MB): gRPC refuses it
            infer(client, pixels(800, 1000))
        elif case == "over the pixel limit":  # a shape saying 50 MP, no data behind it
            image = grpcclient.InferInput("image", [1, 5000, 10000, 3], "UINT8")
            image._raw_content = b"\0" * 10
            client.infer(NAME, [image], headers=dict(AUTH))
        elif case == "images of two sizes":  # one [N, H, W] answer cannot hold them
            blobs = [image_bytes(16, 24, "PNG"), image_bytes(24, 16, "PNG")]
            image = grpcclient.InferInput("image", [2], "BYTES")
            image.set_data_from_numpy(np.array(blobs, dtype=np.object_))
            client.infer(NAME, [image], headers=dict(AUTH))
        else:
            image = grpcclient.InferInput("image", [1, 8, 8, 4], "UINT8")
            image.set_data_from_numpy(np.zeros((1, 8, 8, 4), np.uint8))
            client.infer(NAME, [image], headers=dict(AUTH))
    assert refused.value.status() == f"StatusCode.{status}", refused.value.message()


def test_grpc_refusals_are_counted_under_the_reasons_http_uses(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    image = grpcclient.InferInput("image", [1, 8, 8, 3], "UINT8")
    image.set_data_from_numpy(pixels(8, 8))
    with pytest.raises(InferenceServerException):
        client.infer(NAME, [image])  # no key
    with pytest.raises(InferenceServerException):
        client.infer(NAME, [image], model_version="one", headers=dict(AUTH))
    with server.client(headers=dict(AUTH)) as c:
        samples = metric_samples(c.get("/metrics").text)["segserve_rejected_total"]
    reasons = {s.labels["reason"]: s.value for s in samples}
    assert reasons.get("unauthorized", 0) >= 1 and reasons.get("bad_request", 0) >= 1
    assert not any(r.isdigit() for r in reasons), reasons  # a bare status: no reason given


@pytest.mark.parametrize(
    "authorization, accepted",
    [
        (f"bearer {KEY}", True),  # the scheme's case is free, as over HTTP
        (f"Bearer {KEY}x", False),
        (f"Basic {KEY}", False),
        (KEY, False),
    ],
)
def test_the_key_is_checked_as_http_checks_it(server, authorization, accepted):
    client = grpcclient.InferenceServerClient(server.grpc)
    if accepted:
        assert client.is_model_ready(NAME, headers={"authorization": authorization})
        return
    with pytest.raises(InferenceServerException) as refused:
        client.is_model_ready(NAME, headers={"authorization": authorization})
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"


def test_grpc_health_v1_says_serving(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_committed_stubs_are_what_grpcio_tools_makes_of_the_proto(tmp_path):
    for generated in grpc_stubs.generate(tmp_path):
        committed = ROOT / "service" / "protocols" / generated.name
        assert filecmp.cmp(generated, committed, shallow=False), f"regenerate {committed.name}"


def test_grpc_is_off_unless_a_port_is_set_and_off_or_empty_turn_it_off(monkeypatch):
    from segserve.service.settings import Settings

    assert Settings().grpc_port is None
    monkeypatch.setenv("SEGSERVE_GRPC_PORT", "8001")  # what the images set
    assert Settings().grpc_port == 8001
    for off in ("off", "OFF", ""):
        monkeypatch.setenv("SEGSERVE_GRPC_PORT", off)
        assert Settings().grpc_port is None
    monkeypatch.setenv("SEGSERVE_GRPC_PORT", "80O1")
    with pytest.raises(ValueError, match="grpc_port"):
        Settings()
