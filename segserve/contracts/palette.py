"""Label maps as PASCAL VOC writes them: class ids 0..C-1 (0 = background), 255 = "ignore"
in ground truth, and the VOC colour map, so label PNGs open with VOC colours anywhere."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Ground-truth pixels with this label (object boundaries, padding) are left out of the loss
# and of every score.
IGNORE_LABEL = 255

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette(n: int = 256) -> list[list[int]]:
    """The VOC colour map: the bits of the class id interleaved into R, G and B from the top."""
    return [list(rgb) for rgb in _VOC[:n]]


def _voc_colour(i: int) -> tuple[int, int, int]:
    r = g = b = 0
    for j in range(8):
        r |= ((i >> 0) & 1) << (7 - j)
        g |= ((i >> 1) & 1) << (7 - j)
        b |= ((i >> 2) & 1) << (7 - j)
        i >>= 3
    return r, g, b


_VOC = tuple(_voc_colour(i) for i in range(256))  # computed once: every label PNG uses it


def pil_palette(colors: list[list[int]]) -> bytes:
    """768 bytes for Image.putpalette: the classes' colours, then VOC's for the rest (so 255 =
    ignore shows as VOC's cream border colour)."""
    return _pil_palette(tuple(tuple(c) for c in colors))


@lru_cache(maxsize=64)  # one entry per model: every label PNG of it uses the same bytes
def _pil_palette(colors: tuple[tuple[int, ...], ...]) -> bytes:
    full = [*colors, *_VOC[len(colors) :]]
    return bytes(int(v) for rgb in full[:256] for v in rgb)


def palette_array(colors: list[list[int]]) -> np.ndarray:
    """256x3 uint8 lookup table from label id to colour."""
    return np.frombuffer(pil_palette(colors), dtype=np.uint8).reshape(256, 3)
