"""The answer to /segment in each format, from labels and the model card: pure functions."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import numpy as np

from segserve.contracts.card import ModelCard
from segserve.service.imaging import (
    class_stats,
    encode_label_png,
    encode_mask_png,
    encode_rgb,
    encode_rle,
    overlay,
)

FORMATS = ("png", "json", "overlay")
MASK_ENCODINGS = ("png", "rle")
JSON_TIMINGS = ("decode", "queue", "inference", "postprocess", "total")


class MaskSpecError(ValueError):
    """`masks=` names a class the model does not have."""


def parse_masks(spec: str, card: ModelCard) -> list[int]:
    """`none` | `all` | comma-separated class names or ids -> class ids."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(range(card.num_classes))
    ids = []
    for key in (k.strip() for k in spec.split(",") if k.strip()):
        try:
            ids.append(card.class_id(key))
        except KeyError:
            raise MaskSpecError(
                f"masks: unknown class {key!r}; classes are {', '.join(card.class_names)}"
            ) from None
    return ids


@dataclass(frozen=True)
class RenderSpec:
    format: str = "png"
    mask_ids: tuple[int, ...] = ()
    mask_encoding: str = "png"


def class_summary(labels: np.ndarray, card: ModelCard) -> list[dict]:
    """Every class present: id, name, colour, pixels and share of the image."""
    counts = class_stats(labels, card.num_classes)
    total = int(labels.size)
    return [
        {
            "id": int(i),
            "name": card.class_names[i],
            "color": card.palette[i],
            "pixels": int(counts[i]),
            "fraction": float(counts[i] / total),
        }
        for i in np.flatnonzero(counts)
    ]


def render(
    rgb: np.ndarray,
    labels: np.ndarray,
    card: ModelCard,
    spec: RenderSpec,
    header: dict,
    timings: dict[str, float],
    started: float,
) -> tuple[bytes, str]:
    """(body, media type). `header` opens the JSON answer (model, version, ...); the
    postprocess and encode stages are added to `timings`; `started` (time.perf_counter) is
    when the request arrived, for the JSON answer's total."""
    t0 = time.perf_counter()
    if spec.format == "png":
        timings["postprocess"] = 0.0
        body = encode_label_png(labels, card.palette_bytes)
        timings["encode"] = time.perf_counter() - t0
        return body, "image/png"
    if spec.format == "overlay":
        blended = overlay(rgb, labels, card.palette)
        t1 = time.perf_counter()
        timings["postprocess"] = t1 - t0
        body = encode_rgb(blended)
        timings["encode"] = time.perf_counter() - t1
        return body, "image/png"
    classes = class_summary(labels, card)
    masks = {}
    for cid in spec.mask_ids:
        mask = labels == cid
        masks[card.class_names[cid]] = (
            encode_rle(mask)
            if spec.mask_encoding == "rle"
            else base64.b64encode(encode_mask_png(mask)).decode()
        )
    label_png = base64.b64encode(encode_label_png(labels, card.palette_bytes)).decode()
    t1 = time.perf_counter()
    timings["postprocess"] = t1 - t0
    payload = {
        **header,
        "width": int(labels.shape[1]),
        "height": int(labels.shape[0]),
        "classes": classes,
        "label_png": label_png,
        "masks": masks,
        "timings_ms": {
            k: round(v * 1000, 3)
            for k, v in {**timings, "total": time.perf_counter() - started}.items()
            if k in JSON_TIMINGS
        },
    }
    body = json.dumps(payload).encode()
    timings["encode"] = time.perf_counter() - t1
    return body, "application/json"
