"""What the HTTP API answers, as pydantic models, and the OpenAPI pieces the routes cannot
say through their signatures (an image request body, binary responses, every error).

The routes that answer JSON from Python objects (/models, health) are validated against
these models; /segment and v2 build their bodies by hand for speed, so their models here
describe them and tests/test_openapi.py holds the answers to the description.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from segserve.service.errors import CODES
from segserve.service.telemetry.clock import JSON_STAGES, TOTAL, Stage

RGB = list[int]


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: str = Field(description="a short code: " + ", ".join(sorted(set(CODES.values()))))
    detail: str = Field(description="what went wrong, for a person")
    request_id: str | None = Field(None, description="the X-Request-ID of the request")


class ClassColor(BaseModel):
    id: int
    name: str
    color: RGB = Field(description="the class colour in the palette, [r, g, b]")


class ClassShare(ClassColor):
    pixels: int = Field(description="pixels of this class in the label image")
    fraction: float = Field(description="pixels / all pixels")


class RunLength(BaseModel):
    """COCO's uncompressed RLE (pycocotools: mask.frPyObjects(rle, h, w))."""

    size: list[int] = Field(description="[height, width]")
    counts: list[int] = Field(description="run lengths, column-major, starting with a 0-run")


class Inference(BaseModel):
    """What was done to the image before and while the network saw it."""

    policy: str = Field(description="native: at its own resolution; fit: scaled down first")
    height: int = Field(description="the height the network saw the image at")
    width: int = Field(description="the width the network saw the image at")
    tiles: int = Field(description="tiles it ran in (1: whole)")
    tile: int | None = Field(None, description="the side of a tile, when it ran in tiles")
    halo: int | None = Field(None, description="context each tile brought around what it kept")


class SegmentResult(BaseModel):
    """POST /segment?format=json."""

    model: str
    version: int
    inference: Inference
    width: int
    height: int
    classes: list[ClassShare] = Field(description="every class present in the image")
    label_png: str = Field(description="the label PNG (palette mode), base64")
    masks: dict[str, str | RunLength] = Field(
        description="requested class name -> a 1-bit PNG (base64) or a COCO RLE"
    )
    timings_ms: dict[str, float] = Field(
        description=", ".join([*(s.value for s in JSON_STAGES), TOTAL]) + " (ms)"
    )


class ModelInput(BaseModel):
    mean: list[float] | None
    std: list[float] | None
    dtype: str = Field(description="uint8 (pixels in) or float32 (normalised in)")
    layout: str = Field(description="NHWC or NCHW")
    size_divisor: int


class ModelScale(BaseModel):
    """How the model meets an image larger than one tile."""

    policy: str = Field(description="what a request gets unless it asks (scale=native|fit)")
    policies: list[str] = Field(description="the policies a request may ask for")
    fit_pixels: int = Field(description="fit: the working size images are scaled down to")
    tile: int = Field(description="native: the side of a tile on this server's provider")
    halo: int = Field(description="native: px of context each tile brings around what it keeps")


class Candidate(BaseModel):
    """One runtime x arithmetic a version could serve with on this machine."""

    name: str = Field(description="float32, int8, openvino-float32, openvino-bf16, ...")
    runtime: str = Field(description="onnxruntime or openvino")
    arithmetic: str = Field(description="what it computes in: float32, bf16, int8, float16")
    file: str = Field(description="the file it runs: model.onnx or a variant beside it")
    verdict: str = Field(
        description="serving; slower (timed, not clearly faster than what serves); refused "
        "(failed its check on the check set, did not load or run, or may not serve "
        "unchecked); stale (a variant file made from another model.onnx: never run); "
        "unavailable (this CPU lacks the arithmetic); skipped (another was forced)"
    )
    reason: str
    seconds: float | None = Field(description="median seconds of one timed round (None: untimed)")
    speedup: float | None = Field(description="the version's own seconds over these")
    agreement: float | None = Field(
        description="share of check-set pixels with float32's label (None: not checked)"
    )
    mean_iu: float | None = Field(description="on the check set (None: not checked)")


class VariantChoice(BaseModel):
    """Which runtime and arithmetic serve this version, and how that was decided here."""

    variant: str = Field(description="the candidate that serves, e.g. float32 or openvino-bf16")
    mode: str = Field(description="auto (measured here) or the candidate the setting forced")
    reason: str
    seconds: dict[str, float] = Field(
        description="median over rounds of each timed candidate's seconds for one round"
    )
    shapes: list[str] = Field(description="the warm-up shapes")
    rounds: int
    threshold: float = Field(
        description="another candidate serves only when the version's own takes this many "
        "times as long"
    )
    round: list[str] = Field(
        description="what one timed round runs: each warm-up shape, a shape new to every "
        "candidate in each round, a batch as the batcher forms them"
    )
    load_seconds: dict[str, float] = Field(description="what timing and checking cost at load")
    candidates: list[Candidate]


class ModelSummary(BaseModel):
    name: str
    version: int = Field(description="the version answering by default: the newest")
    versions: list[int]
    architecture: str
    provider: str = Field(description="the device it runs on: cpu, cuda or tensorrt")
    ready: bool
    classes: list[ClassColor]
    input: ModelInput
    output: str = Field(description="labels (argmax in the graph) or logits")
    scale: ModelScale
    variant: str = Field(
        description="the runtime x arithmetic that serves: float32, int8, openvino-bf16, ..."
    )
    variants: list[str] = Field(description="the variant files this version has on disk")
    variant_choice: VariantChoice


class CheckSetScores(BaseModel):
    images: int
    mean_iu: float
    per_class_iu: list[float | None] = Field(
        description="None: a class absent from truth and prediction"
    )


class VersionState(BaseModel):
    version: int
    state: str = Field(
        description="serving (requests naming no version get it), pinned (serving because "
        "REPO/NAME/pin names it), loaded (reachable by number: what a pin rolls back to), "
        "candidate (being scored), refused (by the check-set gate: never served)"
    )
    scores: CheckSetScores | None = Field(description="on the model's check set (None: ungated)")
    reason: str | None = Field(
        description="why a version was refused, or that it is ungated (no check set)"
    )


class Gate(BaseModel):
    gated: bool = Field(description="false: the model has no check set, versions go live ungated")
    check_set_images: int | None
    tolerance: float = Field(
        description="how far under the serving version's mean IU a new one may score"
    )
    class_floor: float | None = Field(description="no class's IU may fall under it")
    pinned: int | None = Field(description="the version REPO/NAME/pin names, if any")


class ModelDetail(ModelSummary):
    gate: Gate
    version_states: list[VersionState]
    card: dict[str, Any] = Field(
        description="the serving variant's model card as export, import or quantize wrote it "
        "(an int8 card records its quantization and quality gate)"
    )


class FailedVersion(BaseModel):
    name: str
    version: int
    error: str


class ModelListing(BaseModel):
    default: str | None
    models: list[ModelSummary]
    failed: list[FailedVersion] = Field(description="versions that did not load, and why")


class Live(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str
    models: list[str]
    providers: list[str]


ERROR_TEXT = {
    400: "the body is not a decodable image, or the request is malformed",
    401: "an API key is set and the request did not bring it (Authorization: Bearer KEY)",
    404: "no such model or version",
    408: "the body did not arrive in time",
    413: "the body, the image or all images of the request are over a limit",
    415: "the body is not an image type this server decodes",
    422: "a query parameter is invalid",
    499: "the client went away before the answer",
    503: "the queue is full, the wait would be too long, or the model is not ready (Retry-After)",
    504: "the request's deadline passed",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses, each with the error body."""
    return {s: {"model": ErrorBody, "description": ERROR_TEXT[s]} for s in statuses}


def png(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }


# POST /segment reads its body itself (body.py), so the spec states it here: the image as
# the whole body, or as the `image` field of a form (what "Try it out" uploads).
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "an image (JPEG, PNG, WebP, ...): the raw bytes or a form field `image`",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=png: the label PNG (palette mode, one index per pixel); "
        "format=overlay: the image with class colours; format=json: the result",
        "model": SegmentResult,  # application/json
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            "Server-Timing": {
                "description": "stage durations: " + ", ".join(s.value for s in Stage),
                "schema": {"type": "string"},
            },
            "X-Model": {"description": "the model that answered", "schema": {"type": "string"}},
            "X-Model-Version": {"schema": {"type": "string"}},
            "X-Request-ID": {"schema": {"type": "string"}},
            "X-Scale": {
                "description": "native (the image's own resolution) or fit (scaled down first)",
                "schema": {"type": "string", "enum": ["native", "fit"]},
            },
            "X-Inference-Size": {
                "description": "WIDTHxHEIGHT the network saw the image at",
                "schema": {"type": "string"},
            },
            "X-Tiles": {
                "description": "tiles the image ran in (1: whole)",
                "schema": {"type": "integer"},
            },
        },
    },
    **errors(400, 401, 404, 408, 413, 415, 422, 503, 504),
}

METRICS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **errors(401),
}

# v2 infer: JSON (Open Inference Protocol), or that JSON followed by binary tensor data
# (Inference-Header-Content-Length says where the JSON ends), as tritonclient sends it.
V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    },
}
V2_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "input `image`: UINT8 [N, H, W, 3] pixels or BYTES [N] encoded images",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": V2_TENSOR, "minItems": 1},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    }
}
V2_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "output `labels`: UINT8 [N, H, W]; binary when the request asked",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": V2_TENSOR},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **errors(400, 401, 404, 408, 413, 415, 422, 503, 504),
}
