"""The Open Inference Protocol (KServe v2, as Triton speaks it): requests parsed strictly with
pydantic, responses built, as pure functions. The routes (routes/v2.py) run them through the
same decode, budgets and batcher as /segment.

Input `image`: UINT8 [N, H, W, 3] RGB pixels, or BYTES [N] encoded images (JPEG, PNG, ...)
of one size. Output `labels`: UINT8 [N, H, W]. JSON tensors and the binary tensor data
extension (Inference-Header-Content-Length) both work, so tritonclient's HTTP client runs
unchanged against segserve.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segserve import __version__
from segserve.service.errors import ServiceError
from segserve.service.limits import RequestLimits

HEADER_LENGTH = "inference-header-content-length"
Dim = Annotated[int, Field(ge=0, le=2**31)]


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send parameters of their own

    binary_data_size: Annotated[int, Field(ge=0)] | None = None
    binary_data: bool | None = None
    binary_data_output: bool | None = None
    # segserve's own, request-level: the scale policy (native or fit; default: the model's).
    scale: Literal["native", "fit"] | None = None


class InferInput(BaseModel):
    name: Annotated[str, Field(max_length=256)]
    shape: Annotated[list[Dim], Field(max_length=8)]
    datatype: Annotated[str, Field(max_length=16)]
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferOutput(BaseModel):
    name: Annotated[str, Field(max_length=256)]
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    id: Annotated[str, Field(max_length=256)] | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=8)]
    outputs: Annotated[list[InferOutput], Field(max_length=8)] | None = None


def bad(detail: str) -> ServiceError:
    return ServiceError(400, detail, reason="bad_request")


def require_one_size(sizes: list[tuple[int, int]]) -> None:
    """The answer is one [N, H, W] tensor: the decoded images of a request share one size."""
    if len(set(sizes)) > 1:
        raise bad("the images of one request must share one size (output is [N, H, W])")


def server_metadata() -> dict:
    return {"name": "segserve", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(name: str, versions: list[int]) -> dict:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]}],
    }


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The validated request and the binary tensor data after its JSON."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if (
            not header_length.isascii()
            or not header_length.isdigit()
            or int(header_length) > len(body)
        ):
            raise bad("Inference-Header-Content-Length does not fit the body")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = InferRequest.model_validate_json(json_part)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "request"
        raise bad(f"invalid inference request: {where}: {first.get('msg', '')}") from None
    for out in request.outputs or []:
        if out.name != "labels":
            raise bad(f"unknown output {out.name!r}: the model's output is 'labels'")
    declared = [i.parameters.binary_data_size for i in request.inputs if i.parameters]
    expected = sum(d for d in declared if d is not None)
    if expected != len(binary):
        raise bad(f"binary data is {len(binary)} bytes; the inputs declare {expected}")
    return request, binary


def _bytes_elements(raw: bytes | memoryview) -> list[bytes]:
    """BYTES tensors in binary form: each element a 4-byte little-endian length, then bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad("truncated BYTES tensor")
        items.append(bytes(raw[pos : pos + n]))
        pos += n
    return items


def parse_infer(
    body: bytes, header_length: str | None, limits: RequestLimits
) -> tuple[InferRequest, np.ndarray | list[bytes]]:
    """The validated request and its `image` input: a UINT8 [N, H, W, 3] array, or the N
    encoded images of a BYTES input. Counts and sizes are checked before data is unpacked."""
    request, binary = parse_request(body, header_length)
    return request, image_input(request, binary, limits)


def image_input(
    request: InferRequest, binary: bytes, limits: RequestLimits
) -> np.ndarray | list[bytes]:
    """The `image` input: a UINT8 [N, H, W, 3] array, or the N encoded images of a BYTES input."""
    offset, raw, spec = 0, None, None
    for inp in request.inputs:  # binary tensors follow the JSON in the inputs' order
        size = inp.parameters.binary_data_size if inp.parameters else None
        if inp.name == "image":
            spec = inp
            # A view, not a copy: a 20 MB tensor is held once, as its body.
            raw = memoryview(binary)[offset : offset + size] if size is not None else None
        offset += size or 0
    if spec is None:
        raise bad("the request has no input named 'image'")
    if spec.shape:
        limits.check_count(spec.shape[0])
    if raw is None and spec.data is None:
        raise bad("input 'image' has neither data nor binary_data_size")
    if spec.datatype == "UINT8":
        return _pixels(spec, raw, limits)
    if spec.datatype == "BYTES":
        blobs = _bytes_elements(raw) if raw is not None else _base64_list(spec.data)
        if not blobs:
            raise bad("input 'image' is empty")
        if spec.shape != [len(blobs)]:
            raise bad(
                f"BYTES input 'image' holds {len(blobs)} elements; its shape says {spec.shape}"
            )
        return blobs
    raise bad(f"input 'image' must be UINT8 or BYTES, not {spec.datatype}")


def _pixels(spec: InferInput, raw: bytes | None, limits: RequestLimits) -> np.ndarray:
    shape = spec.shape
    if len(shape) != 4 or shape[3] != 3:
        raise bad(f"UINT8 input 'image' must be [N, H, W, 3] RGB, not {shape}")
    n, h, w = shape[:3]
    if n < 1 or h < 1 or w < 1:
        raise bad("input 'image' is empty")
    limits.check_pixels([(h, w)] * n)
    if raw is not None:
        if len(raw) != n * h * w * 3:
            raise bad(f"binary data is {len(raw)} bytes; shape {shape} needs {n * h * w * 3}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, 3)
    try:
        values = np.asarray(spec.data)
    except (ValueError, TypeError) as exc:
        raise bad(f"input 'image' data is not a regular array: {exc}") from None
    if values.dtype.kind not in "iu" or values.size != n * h * w * 3:
        raise bad(f"UINT8 input 'image' needs {n * h * w * 3} integers for shape {shape}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise bad("UINT8 input 'image' holds values outside 0..255")
    return values.astype(np.uint8).reshape(n, h, w, 3)


def _base64_list(data: list[Any] | None) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise bad("BYTES input 'image' in JSON must be a list of base64 strings")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except ValueError as exc:
        raise bad(f"BYTES input 'image' is not base64: {exc}") from None


def wants_binary(request: InferRequest) -> bool:
    default = bool(request.parameters and request.parameters.binary_data_output)
    for out in request.outputs or []:
        if out.parameters and out.parameters.binary_data is not None:
            return out.parameters.binary_data
    return default


def infer_response(
    model: str, version: int, request: InferRequest, labels: list[np.ndarray]
) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers) of the answer: `labels` [N, H, W] UINT8, as binary tensor
    data or a JSON tensor, as the request asked."""
    stacked = np.stack(labels)
    output: dict = {"name": "labels", "datatype": "UINT8", "shape": list(stacked.shape)}
    response: dict = {"model_name": model, "model_version": str(version), "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if wants_binary(request):
        data = stacked.tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps(response).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        return header + data, "application/octet-stream", headers
    output["data"] = stacked.ravel().tolist()
    return json.dumps(response, separators=(",", ":")).encode(), "application/json", {}
