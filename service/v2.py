"""The Open Inference Protocol (KServe v2, as Triton speaks it): the request format, as pure
functions. The routes (routes/v2.py) run it through the same decode and batcher as /segment.

Input `image`: UINT8 [N, H, W, 3] RGB pixels, or BYTES [N] encoded images (JPEG, PNG, ...)
of one size. Output `labels`: UINT8 [N, H, W]. JSON tensors and the binary tensor data
extension (Inference-Header-Content-Length) both work, so tritonclient's HTTP client runs
unchanged against segserve.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np

from segserve.service.errors import ServiceError

HEADER_LENGTH = "inference-header-content-length"


def model_metadata(name: str, versions: list[int]) -> dict:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]}],
    }


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON request object and the binary tensor data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ServiceError(
                400, "Inference-Header-Content-Length does not fit the body", reason="bad_request"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(json_part)
    except ValueError as exc:
        raise ServiceError(
            400, f"inference request is not JSON: {exc}", reason="bad_request"
        ) from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ServiceError(400, "inference request needs an 'inputs' list", reason="bad_request")
    return request, binary


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensors in binary form: each element a 4-byte little-endian length, then bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ServiceError(400, "truncated BYTES tensor", reason="bad_request")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ServiceError(400, "truncated BYTES tensor", reason="bad_request")
        items.append(raw[pos : pos + n])
        pos += n
    return items


def image_input(request: dict, binary: bytes, max_pixels: int) -> np.ndarray | list[bytes]:
    """The `image` input: a UINT8 [N, H, W, 3] array, or the N encoded images of a BYTES input."""
    inputs = {i.get("name"): i for i in request["inputs"] if isinstance(i, dict)}
    if "image" not in inputs:
        raise ServiceError(400, "the request has no input named 'image'", reason="bad_request")
    offset = 0
    raw: bytes | None = None
    for spec in request["inputs"]:  # binary tensors follow the JSON in the inputs' order
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ServiceError(
                400, "binary_data_size does not fit the binary data sent", reason="bad_request"
            )
        if spec.get("name") == "image":
            raw = binary[offset : offset + size]
        offset += size
    spec = inputs["image"]
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ServiceError(
            400, "input 'image' needs a shape of non-negative integers", reason="bad_request"
        )
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise ServiceError(
                400,
                f"UINT8 input 'image' must be [N, H, W, 3] RGB, not {shape}",
                reason="bad_request",
            )
        n, h, w = shape[:3]
        if n < 1 or h < 1 or w < 1:
            raise ServiceError(400, "input 'image' is empty", reason="bad_request")
        if h * w > max_pixels:
            raise ServiceError(
                413,
                f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
                reason="too_many_pixels",
            )
        if raw is not None:
            if len(raw) != n * h * w * 3:
                raise ServiceError(
                    400,
                    f"binary data is {len(raw)} bytes; shape {shape} needs {n * h * w * 3}",
                    reason="bad_request",
                )
            return np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, 3)
        try:
            return np.asarray(spec.get("data"), dtype=np.uint8).reshape(n, h, w, 3)
        except (ValueError, TypeError) as exc:
            raise ServiceError(
                400, f"input 'image' data does not fit shape {shape}: {exc}", reason="bad_request"
            ) from exc
    if datatype == "BYTES":
        if raw is not None:
            blobs = _bytes_elements(raw)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
                raise ServiceError(
                    400,
                    "BYTES input 'image' in JSON must be a list of base64 strings",
                    reason="bad_request",
                )
            try:
                blobs = [base64.b64decode(d, validate=True) for d in data]
            except ValueError as exc:
                raise ServiceError(
                    400, f"BYTES input 'image' is not base64: {exc}", reason="bad_request"
                ) from exc
        if not blobs:
            raise ServiceError(400, "input 'image' is empty", reason="bad_request")
        return blobs
    raise ServiceError(
        400, f"input 'image' must be UINT8 or BYTES, not {datatype}", reason="bad_request"
    )


def wants_binary(request: dict) -> bool:
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    for out in request.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == "labels":
            return bool((out.get("parameters") or {}).get("binary_data", default))
    return default
