"""Labels to the answer's bytes, in each format, from the labels and the model card: the
label PNG, the overlay, JSON with class shares and masks (PNG or COCO RLE). Pure functions.
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from segserve.contracts.card import ModelCard
from segserve.contracts.palette import palette_array, pil_palette
from segserve.service.telemetry.clock import JSON_STAGES, Stage, Timings


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
    timings: Timings,
) -> tuple[bytes, str]:
    """(body, media type). `header` opens the JSON answer (model, version, ...); the
    postprocess and encode stages go into `timings`."""
    if spec.format == "png":
        with timings.stage(Stage.ENCODE):
            return encode_label_png(labels, card.palette_bytes), "image/png"
    if spec.format == "overlay":
        with timings.stage(Stage.POSTPROCESS):
            blended = overlay(rgb, labels, card.palette)
        with timings.stage(Stage.ENCODE):
            return encode_rgb(blended), "image/png"
    with timings.stage(Stage.POSTPROCESS):
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
    with timings.stage(Stage.ENCODE):
        payload = {
            **header,
            "width": int(labels.shape[1]),
            "height": int(labels.shape[0]),
            "classes": classes,
            "label_png": label_png,
            "masks": masks,
            "timings_ms": timings.milliseconds(JSON_STAGES),
        }
        return json.dumps(payload).encode(), "application/json"


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels at another size, by nearest neighbour (class ids are not averaged)."""
    if labels.shape == (height, width):
        return labels
    return np.asarray(
        Image.fromarray(labels, "L").resize((width, height), Image.Resampling.NEAREST)
    )


def encode_label_png(labels: np.ndarray, palette: list[list[int]] | bytes) -> bytes:
    """A mode-P PNG of class ids with the palette embedded (colours, or the 768 bytes of
    `pil_palette`). zlib level 1 with the run-length strategy: label maps are runs, and
    measured at the same CPU as plain level 1 it makes a third fewer bytes."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), "P")
    image.putpalette(palette if isinstance(palette, bytes) else pil_palette(palette))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


# Rows blended at a time: the float temporaries stay a strip's, never the image's (a 40 MP
# image would otherwise need about a gigabyte of float32 for its overlay).
OVERLAY_STRIP_PIXELS = 1 << 20


def overlay(
    rgb: np.ndarray, labels: np.ndarray, palette: list[list[int]], alpha: float = 0.5
) -> np.ndarray:
    """The image blended with class colours; background (class 0) left untouched."""
    colors = palette_array(palette)
    out = np.empty_like(rgb)
    rows = max(1, OVERLAY_STRIP_PIXELS // max(1, rgb.shape[1]))
    for top in range(0, rgb.shape[0], rows):
        strip, lab = rgb[top : top + rows], labels[top : top + rows]
        blended = strip.astype(np.float32)
        fg = lab > 0
        blended[fg] = (1 - alpha) * blended[fg] + alpha * colors[lab[fg]]
        out[top : top + rows] = blended.round()
    return out


def encode_rgb(rgb: np.ndarray, fmt: str = "PNG", compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=compress_level)
    else:
        Image.fromarray(rgb, "RGB").save(buf, format=fmt, quality=90)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A 1-bit PNG of one class's pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def encode_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a 0-run.

    pycocotools reads it with `mask.frPyObjects(rle, h, w)` then `mask.decode`.
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_rle(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(h * w, dtype=bool)
    pos, on = 0, False
    for n in rle["counts"]:
        if on:
            values[pos : pos + n] = True
        pos += n
        on = not on
    return values.reshape((h, w), order="F")


def class_stats(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count per class id (0..num_classes-1)."""
    return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
