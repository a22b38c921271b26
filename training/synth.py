"""A synthetic segmentation data set in PASCAL VOC layout, deterministic by seed.

Eight object classes plus background. A class is its shape and its texture: every class
draws its colours from the same range, so colour alone never decides the class. Objects come in many sizes, occlude each other,
some have thin parts (rings, crosses, bars) and fine boundaries, and a 255 "ignore" band
runs along every object border as in VOC's annotations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segserve.contracts.palette import IGNORE_LABEL, pil_palette, voc_palette

SYNTH_CLASSES = (
    "background",
    "disc",
    "ring",
    "square",
    "triangle",
    "star",
    "cross",
    "bar",
    "hexagon",
)
# Each class has its own texture (and shape); the texture's two colours are drawn from the
# same range for every class, so colour alone never decides the class.
CLASS_TEXTURES = {
    "disc": "solid",
    "ring": "gradient",
    "square": "checker",
    "triangle": "stripes",
    "star": "dots",
    "cross": "grid",
    "bar": "speckle",
    "hexagon": "blobs",
}
# VOC's border band is about 5 px wide on 500-px images; these are 160..512 px, and a 5-px
# band left thin rings and bars with almost no labelled pixel (their IU could not rise).
IGNORE_BAND = 3  # px
JPEG_QUALITY = 92  # the images are stored as JPEG, as VOC's are
MIN_CONTRAST = 120.0
# An object's mean colour is at least this far (RGB distance) from the mean colour of what
# it covers. Without it about one object in twenty (solid discs most) had nearly the colour
# of the background beneath it: labelled, but not there to see.
MIN_OBJECT_CONTRAST = 60.0


@dataclass(frozen=True)
class SynthConfig:
    count: int
    seed: int = 0
    min_size: int = 160
    max_size: int = 512
    val_fraction: float = 0.2
    max_objects: int = 8
    object_scale: tuple[float, float] = (0.12, 0.75)  # object size / the image's short side


# The default model's images (export/bootstrap.py; also the web page's samples): small
# (128..192 px) with at most 5 objects, each a quarter to 70 % of the short side, so that
# more training steps fit in the CPU budget and objects stay large enough to show their shape.
DEFAULT_MODEL_SET = dict(min_size=128, max_size=192, max_objects=5, object_scale=(0.25, 0.7))


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _two_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart (RGB distance >= MIN_CONTRAST) that the texture
    they draw is visible: with no floor, one texture in ten was a near-solid patch that
    only colour could tell apart, and colour is not allowed to decide the class."""
    c1 = _random_color(rng)
    for _ in range(100):
        c2 = _random_color(rng)
        if np.linalg.norm(c1 - c2) >= MIN_CONTRAST:
            return c1, c2
    return c1, 255 - c1


def _coarse_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in 0..1: a small random grid upsampled bilinearly."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _texture(
    rng: np.random.Generator, kind: str, h: int, w: int, region: np.ndarray | None = None
) -> np.ndarray:
    """An h x w x 3 float image of one texture in two random colours. `region` (a boolean
    mask) is where the texture will show: a gradient sweeps across it, not the whole image."""
    c1, c2 = _two_colors(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "solid":
        t = np.zeros((h, w), np.float32)
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 14)
        t = (
            np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
        ).astype(np.float32)
    elif kind == "checker":
        period = int(rng.integers(4, 14))
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif kind == "dots":
        period = rng.uniform(6, 14)
        r = period * rng.uniform(0.2, 0.35)
        t = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < r * r).astype(
            np.float32
        )
    elif kind == "noise":
        t = _coarse_noise(rng, h, w, int(rng.integers(6, 20)))
    elif kind == "speckle":
        t = (rng.random((h, w)) < 0.5).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        # Across the object, not the image: a ring spanning a tenth of the image showed a
        # tenth of the sweep, a near-solid band that only its shape told from a disc.
        shown = ramp[region] if region is not None and region.any() else ramp
        t = np.clip((ramp - shown.min()) / max(float(np.ptp(shown)), 1.0), 0.0, 1.0)
    elif kind == "grid":
        period = int(rng.integers(6, 14))
        t = (((xx % period) < 2) | ((yy % period) < 2)).astype(np.float32)
    elif kind == "blobs":
        # Irregular two-colour patches of 5-15 px. Hexagons wore concentric rings before, and
        # rings are stripes to a small receptive field: 74 % of triangle (stripes) pixels
        # were called hexagon, whether the rings were centred on the object or anywhere.
        t = (_coarse_noise(rng, h, w, max(4, int(max(h, w) / rng.uniform(5, 15)))) > 0.5).astype(
            np.float32
        )
    else:
        raise ValueError(kind)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _visible_texture(
    rng: np.random.Generator, name: str, image: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The pixels of an object of class `name` under `mask`, in colours that stand out from
    what the object covers (up to 20 draws; the last is kept)."""
    beneath = image[mask].mean(axis=0)
    for _ in range(20):
        pixels = _texture(rng, CLASS_TEXTURES[name], *mask.shape, region=mask)[mask]
        if np.linalg.norm(pixels.mean(axis=0) - beneath) >= MIN_OBJECT_CONTRAST:
            break
    return pixels


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * k / n),
            cy + r * math.sin(angle + 2 * math.pi * k / n),
        )
        for k, r in enumerate(radii)
    ]


def _rotated_rect(
    cx: float, cy: float, length: float, width: float, angle: float
) -> list[tuple[float, float]]:
    ca, sa = math.cos(angle), math.sin(angle)
    pts = [
        (-length / 2, -width / 2),
        (length / 2, -width / 2),
        (length / 2, width / 2),
        (-length / 2, width / 2),
    ]
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _shape_mask(rng: np.random.Generator, name: str, h: int, w: int, size: float) -> np.ndarray:
    """A boolean mask of one object of class `name` with its centre anywhere in the image."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 2 * math.pi)
    r = size / 2
    if name == "disc":
        ry = r * rng.uniform(0.7, 1.0)
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=1)
    elif name == "ring":
        thickness = min(max(5.0, r * rng.uniform(0.2, 0.4)), r * 0.5)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        draw.ellipse(
            (cx - r + thickness, cy - r + thickness, cx + r - thickness, cy + r - thickness), fill=0
        )
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [r * math.sqrt(2)] * 4, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, angle), fill=1)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.45] * 5, angle), fill=1)
    elif name == "cross":
        arm = max(5.0, size * rng.uniform(0.15, 0.25))
        draw.polygon(_rotated_rect(cx, cy, size * 1.2, arm, angle), fill=1)
        draw.polygon(_rotated_rect(cx, cy, size * 1.2, arm, angle + math.pi / 2), fill=1)
    elif name == "bar":
        draw.polygon(
            _rotated_rect(cx, cy, size * 2.0, max(6.0, size * rng.uniform(0.08, 0.16)), angle),
            fill=1,
        )
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, [r * 1.1] * 6, angle), fill=1)
    else:
        raise ValueError(name)
    return np.asarray(mask, dtype=bool)


def render_sample(config: SynthConfig, index: int) -> tuple[Image.Image, Image.Image]:
    """Image `index` of the data set: an RGB image and its label map (mode P, 255 = ignore)."""
    rng = np.random.default_rng([config.seed, index])
    h = int(rng.integers(config.min_size, config.max_size + 1))
    w = int(rng.integers(config.min_size, config.max_size + 1))
    # Background: smooth noise between two colours, paler than objects are on average (as
    # in photos, where the scene behind objects is rarely as saturated).
    background = _texture(rng, "noise", h, w)
    image = 0.6 * background + 0.4 * background.mean(axis=2, keepdims=True)
    label = np.zeros((h, w), np.uint8)
    short = min(h, w)
    for _ in range(int(rng.integers(2, config.max_objects + 1))):
        class_id = int(rng.integers(1, len(SYNTH_CLASSES)))
        name = SYNTH_CLASSES[class_id]
        # Log-uniform sizes: from a few per cent of the short side to most of it.
        low, high = config.object_scale
        size = short * math.exp(rng.uniform(math.log(low), math.log(high)))
        mask = _shape_mask(rng, name, h, w, size)
        if mask.sum() < 16:
            continue
        image[mask] = _visible_texture(rng, name, image, mask)  # later objects occlude earlier
        label[mask] = class_id
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    rgb = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    # The ignore band: pixels whose neighbourhood holds more than one class.
    lab = Image.fromarray(label, "L")
    border = np.asarray(lab.filter(ImageFilter.MaxFilter(IGNORE_BAND))) != np.asarray(
        lab.filter(ImageFilter.MinFilter(IGNORE_BAND))
    )
    label[border] = IGNORE_LABEL
    target = Image.fromarray(label, "P")
    target.putpalette(pil_palette(synth_palette()))
    return rgb, target


# Between the samples of a mosaic: the mean colour, as training pads a crop's borders with it
# (segserve train --border-margin): each sample keeps borders of the kind it was trained on.
MOSAIC_FILL = (124, 116, 104)  # ImageNet's mean, 0..255


def render_mosaic(
    config: SynthConfig, size: tuple[int, int], first: int = 0, gap: int = 16
) -> tuple[np.ndarray, np.ndarray, int]:
    """Samples `first`, `first + 1`, ... of the data set laid side by side, each at its own
    size and `gap` px apart, in rows across an (H, W) canvas: a large image whose every
    object is at the scale the samples have (what overlap-tile inference is for). Returns
    the RGB pixels, the labels (255 between samples) and how many samples it holds, each
    whole: a sample the canvas would cut is left out."""
    height, width = size
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = MOSAIC_FILL
    labels = np.full((height, width), IGNORE_LABEL, np.uint8)
    index, top = first, gap
    while top + config.max_size + gap <= height:
        left, row_height = gap, 0
        while True:
            image, target = render_sample(config, index)
            w, h = image.size
            if left + w + gap > width:
                break  # next row: this sample is drawn again there
            index += 1
            rgb[top : top + h, left : left + w] = np.asarray(image)
            labels[top : top + h, left : left + w] = np.asarray(target)
            left, row_height = left + w + gap, max(row_height, h)
        top += row_height + gap
    return rgb, labels, index - first


def synth_palette() -> list[list[int]]:
    return voc_palette(len(SYNTH_CLASSES))


def write_dataset(out: Path, config: SynthConfig, progress: bool = True) -> dict:
    """Write `config.count` samples in VOC layout under `out`; returns a summary."""
    from tqdm import tqdm

    out = Path(out)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    pixels = np.zeros(256, np.int64)
    val_every = max(1, round(1 / config.val_fraction)) if config.val_fraction > 0 else 0
    for i in tqdm(range(config.count), desc="synth", unit="img", disable=not progress):
        image, target = render_sample(config, i)
        name = f"synth_{i:06d}"
        image.save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
        target.save(out / "SegmentationClass" / f"{name}.png")
        pixels += np.bincount(np.asarray(target).ravel(), minlength=256)
        split = "val" if val_every and i % val_every == val_every - 1 else "train"
        splits[split].append(name)
    for split, names in splits.items():
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(n + "\n" for n in names)
        )
    meta = {
        "name": "synthetic-shapes",
        "class_names": list(SYNTH_CLASSES),
        "palette": synth_palette(),
        "seed": config.seed,
        "count": config.count,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "max_objects": config.max_objects,
        "object_scale": list(config.object_scale),
        "val_fraction": config.val_fraction,
    }
    (out / "classes.json").write_text(json.dumps(meta, indent=2))
    total = pixels.sum()
    return {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "class_fraction": {n: float(pixels[i] / total) for i, n in enumerate(SYNTH_CLASSES)}
        | {"ignore": float(pixels[IGNORE_LABEL] / total)},
    }
