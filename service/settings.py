"""All service settings in one place; each can be set as SEGSERVE_<NAME> in the environment.

The memory a request may cost is bounded by settings, not by luck: a per-image pixel limit
(read from the header, before decoding), a per-request limit, a budget of pixels being worked
on at once across requests, an inference size above which images run scaled down, and pixel
budgets for what queues and batches hold. docs/benchmarks.md has the soak that checks them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from segserve.contracts.agreement import MAX_MEAN_IU_DROP, MIN_AGREEMENT
from segserve.service.media.imaging import DEFAULT_FORMATS


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'512x512,375x500' -> [(512, 512), (375, 500)] as (height, width)."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        h, _, w = part.lower().partition("x")
        if not (h.isdigit() and w.isdigit()) or int(h) < 1 or int(w) < 1:
            raise ValueError(f"bad shape {part!r}: expected HxW such as 512x512")
        shapes.append((int(h), int(w)))
    return shapes


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


DEFAULT_BATCH_SIZES = {"cpu": 4, "cuda": 8, "tensorrt": 8}
# The side of the tiles a native image larger than one tile runs in, by provider. CPU:
# measured (docs/benchmarks.md, "Tile size"): a tile costs the same per pixel from 512 to
# 880 px (0.61 s per computed megapixel, U-Net w16, two AVX2 cores); 640 px computes the
# fewest pixels per image pixel over six common large sizes (1.63x, halos and shifted last
# tiles included) and is the shortest run of those (0.25 s): the longest a small request
# waits beside a large image. Images up to the CPU batch bound (0.8 MP) still run whole.
# GPU: a larger tile wastes less on halos and fills a batch; 1536 is a setting to measure
# (no GPU has measured it yet).
DEFAULT_TILE_SIZES = {"cpu": 640, "cuda": 1536, "tensorrt": 1536}
# onnxruntime runs on at least this many pixels hand the CPU arena's memory back when they
# finish; smaller ones keep it for the next run: a photo (VGA is 0.31 MP) and CPU batches of
# a few (three 512x512 images are 0.79 MP), which the batcher keeps under it.
ARENA_SHRINK_PIXELS = 800_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGSERVE_", protected_namespaces=())

    # -- models ---------------------------------------------------------------------------
    repository: Path = Path("model_repository")
    default_model: str | None = None
    # Ready means the default model and these (comma-separated) are loaded and warm; other
    # models that fail to load are listed in /models and a metric, and do not block.
    required_models: str = ""
    # Seconds between looks at the repository for versions added or removed (0: only at start).
    repository_poll_s: float = Field(10.0, ge=0)
    providers: str = "auto"
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    warmup_shapes: str = "512x512,375x500"
    # Which runtime x arithmetic serves a version (service/runtime/variants.py, selection.py):
    # `auto` times every candidate this host has (CPU: the int8 file; with OpenVINO, float32,
    # bf16 and int8 through it; CUDA: float16) against the version's own on the warm-up
    # shapes, a shape none has seen and a batch, `variant_rounds` alternating rounds within
    # `variant_budget_s`, and serves the fastest that is clearly faster and passes its check
    # on the check set (pixels agreeing with float32, mean IU, class floors). A name forces
    # that candidate (still checked; the version's own serves where it fails or is absent).
    variant: Literal[
        "auto",
        "float32",
        "float16",
        "int8",
        "openvino-float32",
        "openvino-bf16",
        "openvino-float16",
        "openvino-int8",
    ] = "auto"
    variant_rounds: int = Field(3, ge=1, le=20)
    variant_budget_s: float = Field(60.0, gt=0)
    variant_min_agreement: float = Field(MIN_AGREEMENT, ge=0, le=1)
    variant_max_mean_iu_drop: float = Field(MAX_MEAN_IU_DROP, ge=0, le=1)
    # The runtimes candidates run on: `auto` = onnxruntime, and OpenVINO where it is
    # installed (the openvino extra) on a CPU host; or a list such as `onnxruntime` (OpenVINO
    # never tried) or `onnxruntime,openvino` (OpenVINO must be installed: a start-up error).
    runtimes: str = "auto"
    # OpenVINO compiles kernels per input shape and caches them (about 2 MB a shape): the
    # cache holds this many shapes, enough for the warm-up and tile shapes that recur.
    openvino_shape_cache: int = Field(16, ge=0)
    # The check-set gate (service/runtime/gate.py): a new version serves only if its mean IU
    # on REPO/NAME/checkset is at most this under the serving version's, and no class under
    # the floor (a card's `class_floor` first; None: no floor).
    gate_tolerance: float = Field(0.01, ge=0, le=1)
    gate_class_floor: float | None = Field(None, ge=0, le=1)
    # Shadow traffic (service/shadow.py): a version that passes the check set while another
    # serves first answers this fraction of live requests in the shadow (its answers
    # discarded, compared with the served ones) and serves only once `shadow_min_requests`
    # agree at `shadow_min_agreement` mean IU or better; 0: off. `shadow`: the models it
    # applies to (empty: all).
    shadow_fraction: float = Field(0.0, ge=0, le=1)
    shadow_models: str = ""
    shadow_min_requests: int = Field(50, ge=1)
    shadow_min_agreement: float = Field(0.95, ge=0, le=1)
    # Drift: the class mix of this many recent images per version against the check set's.
    drift_window: int = Field(200, ge=1)
    # onnxruntime's CPU arena: without it every run page-faults its activations in afresh
    # (13-20 % of CPU throughput; docs/benchmarks.md, "onnxruntime's CPU arena"). An arena
    # keeps its largest run's memory for good, so runs on `arena_shrink_pixels` or more
    # give it back at once; CPU batches of several images stay under it.
    cpu_mem_arena: bool = True
    arena_shrink_pixels: int = Field(ARENA_SHRINK_PIXELS, ge=1)
    # onnxruntime's idle threads spin-wait for work unless told not to: off, measured.
    ort_spinning: bool = False
    # cuDNN's EXHAUSTIVE search re-benchmarks on every new input shape (onnxruntime #6978,
    # #19838): HEURISTIC keeps dynamic shapes cheap.
    cudnn_conv_algo_search: str = "HEURISTIC"

    # -- batching ---------------------------------------------------------------------------
    # None: by provider (DEFAULT_BATCH_SIZES). On CPU, with the arena kept, images of one
    # size run a few per cent faster together (docs/benchmarks.md); the batcher merges
    # other sizes only where its cost model says padding pays.
    max_batch_size: int | None = Field(None, ge=1, le=256)
    # An idle engine runs a request at once; a window > 0 makes an idle engine wait this
    # long for companions (while it is busy, the next batch gathers anyway).
    max_queue_delay_ms: float = Field(0.0, ge=0)
    max_queue: int = Field(64, ge=1)
    # At inference size: no batch computes more pixels, no model's queue holds more.
    max_batch_pixels: int = Field(16_000_000, ge=1)
    max_queued_pixels: int = Field(32_000_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    # A large image computes longer than any queue should make a request wait: its deadline
    # grows by this many seconds per megapixel the network computes past the first (a 40 MP
    # image: 30 + 78 s; it takes 50-60 s alone on two AVX2 cores, docs/benchmarks.md).
    timeout_s_per_megapixel: float = Field(2.0, ge=0)

    # The Open Inference Protocol over gRPC on this port, beside HTTP (None: off; the
    # convention is 8001; the images set it). Needs the `grpc` extra (grpcio,
    # grpcio-health-checking). "off" or "" in the environment turns it off.
    grpc_port: int | None = Field(None, ge=0, le=65535)

    # -- scale --------------------------------------------------------------------------
    # The side of a tile (None: by provider, DEFAULT_TILE_SIZES), rounded down to the model's
    # size divisor and raised to four times its halo where the halo needs it. A native image
    # of more than tile_size**2 pixels runs in tiles; smaller ones run whole.
    tile_size: int | None = Field(None, ge=16, le=8192)
    # The working size of the fit policy, for every model (None: each card's fit_pixels).
    fit_pixels: int | None = Field(None, ge=1)
    # After SIGTERM: seconds of answering requests while unready (and closing keep-alive
    # connections), so that a balancer sees the replica go before it stops listening
    # (service/server.py). Set it above the balancer's health-check interval x failures.
    shutdown_drain_s: float = Field(0.0, ge=0)

    # -- what a request may be -------------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers: 431 beyond
    # Seconds a client may stay silent while sending its request (headers or body): 408 or a
    # closed connection after; slow senders hold nothing longer.
    idle_timeout_s: float = Field(10.0, gt=0)
    image_formats: str = ",".join(DEFAULT_FORMATS)  # what decodes; others: 415
    max_image_pixels: int = Field(40_000_000, ge=1)  # per image, from its header: 413 beyond
    max_request_pixels: int = Field(40_000_000, ge=1)  # all images of one request together
    max_images_per_request: int = Field(16, ge=1)  # v2 infer
    # Pixels decoded, inferred and rendered at once across requests (a native image holds
    # about 4 bytes a pixel: its RGB and its labels, 6 at the peak of its decode; a network's
    # activations are bounded by the tile, not the image): a request waits for its share, or
    # 503 at its deadline. Above max_image_pixels, so that small requests still find room
    # beside the largest image allowed.
    max_inflight_pixels: int = Field(48_000_000, ge=1)
    # Bytes of request bodies being received and held at once, HTTP and gRPC together
    # (service/intake.py): a request takes its declared length (a gRPC message the most it
    # may be while it arrives) before its body is read, or waits for room at most
    # `body_wait_s` (never past half its time), then 503 with Retry-After, its body unread.
    # 256 MiB: a dozen bodies of the 20 MiB limit at once; with the pixel budget's images
    # and a model, a replica stays under 1.5 GiB under any crowd of uploads (measured
    # 1.33-1.41 GiB with every default: docs/operations.md).
    max_inflight_body_bytes: int = Field(256 * 1024 * 1024, ge=1)
    body_wait_s: float = Field(5.0, ge=0)

    # -- who may call what -----------------------------------------------------------------
    # With an API key: /segment, /models, /v2 (but /v2/health) and, unless public, /docs and
    # /metrics need `Authorization: Bearer KEY`. /metrics also takes `metrics_token`, so that
    # Prometheus need not hold the key that runs inference.
    api_key: str | None = None
    metrics_token: str | None = None
    public_metrics: bool = False
    public_docs: bool = False

    log_format: Literal["text", "json"] = "text"

    @field_validator("warmup_shapes")
    @classmethod
    def _valid_shapes(cls, value: str) -> str:
        parse_shapes(value)
        return value

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, value: str) -> str:
        names = parse_list(value.lower())
        if names == ("auto",):
            return "auto"
        if "onnxruntime" not in names or not set(names) <= {"onnxruntime", "openvino"}:
            raise ValueError(
                f"runtimes: auto, or a list of onnxruntime (always: the version's own runs "
                f"on it) and openvino, not {value!r}"
            )
        return ",".join(names)

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _off_is_none(cls, value: object) -> object:
        # An image that serves gRPC by default must be able to say "not here" by environment.
        return None if isinstance(value, str) and value.strip().lower() in ("", "off") else value

    @field_validator("image_formats")
    @classmethod
    def _valid_formats(cls, value: str) -> str:
        from PIL import Image

        Image.init()
        unknown = [f for f in parse_list(value.upper()) if f not in Image.OPEN]
        if unknown or not parse_list(value):
            raise ValueError(f"image_formats: Pillow reads no format named {unknown}")
        return value.upper()

    @model_validator(mode="after")
    def _budgets_fit(self) -> Settings:
        if self.max_inflight_pixels < self.max_image_pixels:
            raise ValueError("max_inflight_pixels must be at least max_image_pixels")
        if self.max_inflight_body_bytes < 2 * self.max_body_bytes:
            # A gRPC message takes twice its most while it arrives (service/protocols).
            raise ValueError("max_inflight_body_bytes must be at least twice max_body_bytes")
        return self

    @field_validator("api_key", "metrics_token")
    @classmethod
    def _not_empty(cls, value: str | None, info) -> str | None:
        # Set but empty is a mistake (a variable exported from an unset one, a secret that
        # came out empty): served openly it would be a hole, refusing every call a mystery.
        if value is not None and not value.strip():
            name = f"SEGSERVE_{info.field_name.upper()}"
            raise ValueError(
                f"{name} is set but empty: give it a value, or unset it to serve without one"
            )
        return value

    @property
    def runtime_names(self) -> tuple[str, ...] | None:
        """The runtimes named (None: auto)."""
        return None if self.runtimes == "auto" else parse_list(self.runtimes)

    def batch_size_for(self, provider: str) -> int:
        return self.max_batch_size or DEFAULT_BATCH_SIZES.get(provider, 1)

    @property
    def shadow(self) -> tuple[str, ...]:
        return parse_list(self.shadow_models)

    def tile_size_for(self, provider: str) -> int:
        return self.tile_size or DEFAULT_TILE_SIZES.get(provider, DEFAULT_TILE_SIZES["cpu"])

    @property
    def warmup(self) -> list[tuple[int, int]]:
        return parse_shapes(self.warmup_shapes)

    @property
    def formats(self) -> tuple[str, ...]:
        return parse_list(self.image_formats)

    @property
    def required(self) -> tuple[str, ...]:
        return parse_list(self.required_models)
