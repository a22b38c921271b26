"""The Open Inference Protocol (KServe v2, as Triton speaks it), through the same batcher.

Input `image`: UINT8 [N, H, W, 3] RGB pixels, or BYTES [N] encoded images (JPEG, PNG, ...)
of one size. Output `labels`: UINT8 [N, H, W]. JSON tensors and the binary tensor data
extension (Inference-Header-Content-Length) both work, so tritonclient's HTTP client runs
unchanged against segserve.
"""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from segserve.service.body import read_capped
from segserve.service.errors import ServiceError
from segserve.service.imaging import ImageDecodeError, ImageTooLarge, decode_image

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
            raise ServiceError(400, "Inference-Header-Content-Length does not fit the body")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(json_part)
    except ValueError as exc:
        raise ServiceError(400, f"inference request is not JSON: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ServiceError(400, "inference request needs an 'inputs' list")
    return request, binary


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensors in binary form: each element a 4-byte little-endian length, then bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ServiceError(400, "truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ServiceError(400, "truncated BYTES tensor")
        items.append(raw[pos : pos + n])
        pos += n
    return items


def input_images(request: dict, binary: bytes, max_pixels: int) -> list[np.ndarray]:
    """Decode the `image` input into a list of H x W x 3 uint8 arrays."""
    inputs = {i.get("name"): i for i in request["inputs"] if isinstance(i, dict)}
    if "image" not in inputs:
        raise ServiceError(400, "the request has no input named 'image'")
    offset = 0
    raw: bytes | None = None
    for spec in request["inputs"]:  # binary tensors follow the JSON in the inputs' order
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ServiceError(400, "binary_data_size does not fit the binary data sent")
        if spec.get("name") == "image":
            raw = binary[offset : offset + size]
        offset += size
    spec = inputs["image"]
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ServiceError(400, "input 'image' needs a shape of non-negative integers")
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise ServiceError(400, f"UINT8 input 'image' must be [N, H, W, 3] RGB, not {shape}")
        n, h, w = shape[:3]
        if n < 1 or h < 1 or w < 1:
            raise ServiceError(400, "input 'image' is empty")
        if h * w > max_pixels:
            raise ServiceError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        if raw is not None:
            if len(raw) != n * h * w * 3:
                raise ServiceError(
                    400, f"binary data is {len(raw)} bytes; shape {shape} needs {n * h * w * 3}"
                )
            array = np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, 3)
        else:
            try:
                array = np.asarray(spec.get("data"), dtype=np.uint8).reshape(n, h, w, 3)
            except (ValueError, TypeError) as exc:
                raise ServiceError(
                    400, f"input 'image' data does not fit shape {shape}: {exc}"
                ) from exc
        return list(array)
    if datatype == "BYTES":
        if raw is not None:
            blobs = _bytes_elements(raw)
        else:
            data = spec.get("data")
            if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
                raise ServiceError(
                    400, "BYTES input 'image' in JSON must be a list of base64 strings"
                )
            import base64

            try:
                blobs = [base64.b64decode(d, validate=True) for d in data]
            except ValueError as exc:
                raise ServiceError(400, f"BYTES input 'image' is not base64: {exc}") from exc
        if not blobs:
            raise ServiceError(400, "input 'image' is empty")
        images = []
        for blob in blobs:
            try:
                images.append(decode_image(blob, max_pixels))
            except ImageTooLarge as exc:
                raise ServiceError(413, str(exc)) from exc
            except ImageDecodeError as exc:
                raise ServiceError(400, str(exc)) from exc
        if len({im.shape for im in images}) > 1:
            raise ServiceError(
                400, "the images of one request must share one size (output is [N, H, W])"
            )
        return images
    raise ServiceError(400, f"input 'image' must be UINT8 or BYTES, not {datatype}")


def wants_binary(request: dict) -> bool:
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    for out in request.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == "labels":
            return bool((out.get("parameters") or {}).get("binary_data", default))
    return default


def build_v2_router(state, segment_array, authorize) -> APIRouter:
    router = APIRouter(prefix="/v2")

    @router.get("")
    async def server_metadata() -> dict:
        return {"name": "segserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @router.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @router.get("/models/{name}", dependencies=[Depends(authorize)])
    @router.get("/models/{name}/versions/{version}", dependencies=[Depends(authorize)])
    async def metadata(name: str, version: int | None = None) -> dict:
        state.registry.get(name, version)
        return model_metadata(name, sorted(state.registry.models[name]))

    @router.get("/models/{name}/ready", dependencies=[Depends(authorize)])
    @router.get("/models/{name}/versions/{version}/ready", dependencies=[Depends(authorize)])
    async def model_ready(name: str, version: int | None = None) -> Response:
        model = state.registry.get(name, version)
        return JSONResponse(
            {"name": name, "ready": model.warmed}, status_code=200 if model.warmed else 503
        )

    @router.post("/models/{name}/infer", dependencies=[Depends(authorize)])
    @router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(authorize)])
    async def infer(name: str, request: Request, version: int | None = None) -> Response:
        model = state.registry.get(name, version)
        body = await read_capped(request, state.settings.max_body_bytes)
        req, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        images = await asyncio.to_thread(input_images, req, binary, state.settings.max_image_pixels)
        # Every image goes through the batcher on its own, so it can share a batch with
        # /segment requests of the same model.
        labels = await asyncio.gather(*(segment_array(model, im, None, {}) for im in images))
        stacked = np.stack(labels).astype(np.uint8)
        output = {"name": "labels", "datatype": "UINT8", "shape": list(stacked.shape)}
        response: dict = {
            "model_name": name,
            "model_version": str(model.version),
            "outputs": [output],
        }
        if "id" in req:
            response["id"] = req["id"]
        headers = {"X-Model": name, "X-Model-Version": str(model.version)}
        if wants_binary(req):
            data = stacked.tobytes()
            output["parameters"] = {"binary_data_size": len(data)}
            header = json.dumps(response).encode()
            headers["Inference-Header-Content-Length"] = str(len(header))
            return Response(header + data, media_type="application/octet-stream", headers=headers)
        output["data"] = stacked.ravel().tolist()
        return JSONResponse(response, headers=headers)

    return router
