"""The Open Inference Protocol as pure functions: requests parsed (JSON and binary tensors,
UINT8 pixels and BYTES images) and checked against the request limits, responses built."""

import base64
import json
import struct

import numpy as np
import pytest

from segserve import __version__
from segserve.service.errors import ServiceError
from segserve.service.limits import RequestLimits
from segserve.service.protocols.open_inference import (
    infer_response,
    parse_infer,
    parse_request,
    require_one_size,
    server_metadata,
)

LIMITS = RequestLimits(max_images=4, max_image_pixels=10_000, max_request_pixels=20_000)


def binary_request(inputs: list[dict], data: bytes, **top) -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs, **top}).encode()
    return header + data, str(len(header))


def test_uint8_pixels_in_binary_form_become_an_n_h_w_3_array():
    pixels = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    body, length = binary_request(
        [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [2, 3, 5, 3],
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        pixels.tobytes(),
    )
    request, image = parse_infer(body, length, LIMITS)
    assert np.array_equal(image, pixels) and request.inputs[0].name == "image"


def test_uint8_pixels_in_json_are_range_checked():
    spec = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 2, 3]}
    ok = json.dumps({"inputs": [{**spec, "data": [0, 1, 2, 3, 4, 255]}]}).encode()
    assert parse_infer(ok, None, LIMITS)[1].shape == (1, 1, 2, 3)
    bad = json.dumps({"inputs": [{**spec, "data": [0, 1, 2, 3, 4, 256]}]}).encode()
    with pytest.raises(ServiceError, match="outside 0..255"):
        parse_infer(bad, None, LIMITS)


def test_bytes_images_come_as_length_prefixed_binary_or_base64_json():
    blobs = [b"\x89PNG one", b"jpeg two"]
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    body, length = binary_request(
        [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        raw,
    )
    assert parse_infer(body, length, LIMITS)[1] == blobs
    data = [base64.b64encode(b).decode() for b in blobs]
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": data}]}
    )
    assert parse_infer(body.encode(), None, LIMITS)[1] == blobs


@pytest.mark.parametrize(
    "inputs, data, status, detail",
    [
        ([{"name": "image", "datatype": "UINT8", "shape": [5, 2, 2, 3]}], None, 413, "5 images"),
        (
            [{"name": "image", "datatype": "UINT8", "shape": [1, 200, 200, 3], "data": [0]}],
            None,
            413,
            "limit is 10000",
        ),
        (
            [{"name": "image", "datatype": "UINT8", "shape": [3, 90, 90, 3], "data": [0]}],
            None,
            413,
            "together",
        ),
        (
            [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2], "data": [0]}],
            None,
            400,
            "[N, H, W, 3]",
        ),
        (
            [{"name": "image", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0]}],
            None,
            400,
            "UINT8 or BYTES",
        ),
        (
            [{"name": "other", "datatype": "UINT8", "shape": [1]}],
            None,
            400,
            "no input named 'image'",
        ),
        (
            [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": 6},
                }
            ],
            struct.pack("<I", 9) + b"ab",
            400,
            "truncated",
        ),
    ],
)
def test_malformed_or_oversized_requests_are_4xx_with_a_reason(inputs, data, status, detail):
    if data is None:
        body, length = json.dumps({"inputs": inputs}).encode(), None
    else:
        body, length = binary_request(inputs, data)
    with pytest.raises(ServiceError) as caught:
        parse_infer(body, length, LIMITS)
    assert caught.value.status == status and detail in caught.value.detail


def test_the_binary_part_must_be_exactly_what_the_inputs_declare():
    body, length = binary_request(
        [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [1, 1, 1, 3],
                "parameters": {"binary_data_size": 3},
            }
        ],
        b"abcd",
    )
    with pytest.raises(ServiceError, match="binary data is 4 bytes; the inputs declare 3"):
        parse_request(body, length)
    with pytest.raises(ServiceError, match="does not fit the body"):
        parse_request(body, "99999")


def test_answers_are_binary_tensors_or_json_as_the_request_asks():
    labels = [np.array([[0, 1], [2, 3]], np.uint8)]
    binary = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}
            ],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
    )
    request, _ = parse_infer(binary.encode(), None, LIMITS)
    body, media, headers = infer_response("m", 3, request, labels)
    size = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:size])
    assert media == "application/octet-stream" and body[size:] == bytes([0, 1, 2, 3])
    assert head["id"] == "r1" and head["model_version"] == "3"
    assert head["outputs"][0]["shape"] == [1, 2, 2]
    request, _ = parse_infer(binary.replace("true", "false").encode(), None, LIMITS)
    body, media, headers = infer_response("m", 3, request, labels)
    assert media == "application/json" and headers == {}
    assert json.loads(body)["outputs"][0]["data"] == [0, 1, 2, 3]


def test_server_metadata_names_the_package_version():
    assert server_metadata()["version"] == __version__


def test_decoded_images_of_two_sizes_cannot_make_one_answer():
    require_one_size([(16, 24), (16, 24)])
    with pytest.raises(ServiceError) as refused:
        require_one_size([(16, 24), (24, 16)])
    assert refused.value.status == 400 and refused.value.reason == "bad_request"
    assert "[N, H, W]" in refused.value.detail
