"""All service settings in one place; each can be set as SEGSERVE_<NAME> in the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'512x512,375x500' -> [(512, 512), (375, 500)] as (height, width)."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        h, _, w = part.lower().partition("x")
        if not (h.isdigit() and w.isdigit()) or int(h) < 1 or int(w) < 1:
            raise ValueError(f"bad shape {part!r}: expected HxW such as 512x512")
        shapes.append((int(h), int(w)))
    return shapes


DEFAULT_BATCH_SIZES = {"cpu": 1, "cuda": 8, "tensorrt": 8}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGSERVE_", protected_namespaces=())

    repository: Path = Path("model_repository")
    default_model: str | None = None
    providers: str = "auto"
    # None: by provider (DEFAULT_BATCH_SIZES). On CPU a batch computes no faster than its
    # images one by one (docs/benchmarks.md), so each image runs alone and waits for no other.
    max_batch_size: int | None = Field(None, ge=1, le=256)
    # An idle engine runs a request at once; a window > 0 makes an idle engine wait this
    # long for companions (while it is busy, the next batch gathers anyway).
    max_queue_delay_ms: float = Field(0.0, ge=0)
    max_queue: int = Field(64, ge=1)
    # Pixel budgets (at inference size): no batch computes more, no queue holds more.
    max_batch_pixels: int = Field(16_000_000, ge=1)
    max_queued_pixels: int = Field(64_000_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    api_key: str | None = None
    log_format: Literal["text", "json"] = "text"
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    warmup_shapes: str = "512x512,375x500"
    # onnxruntime's CPU arena keeps its largest allocation for good; with request-sized
    # shapes that is memory never given back (docs/benchmarks.md), so it is off by default.
    cpu_mem_arena: bool = False
    # onnxruntime's idle threads spin-wait for work unless told not to: off, measured.
    ort_spinning: bool = False
    # cuDNN's EXHAUSTIVE search re-benchmarks on every new input shape (onnxruntime #6978,
    # #19838): HEURISTIC keeps dynamic shapes cheap.
    cudnn_conv_algo_search: str = "HEURISTIC"

    @field_validator("warmup_shapes")
    @classmethod
    def _valid_shapes(cls, value: str) -> str:
        parse_shapes(value)
        return value

    def batch_size_for(self, provider: str) -> int:
        return self.max_batch_size or DEFAULT_BATCH_SIZES.get(provider, 1)

    @property
    def warmup(self) -> list[tuple[int, int]]:
        return parse_shapes(self.warmup_shapes)
