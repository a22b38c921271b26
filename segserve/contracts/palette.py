"""Class colours: the PASCAL VOC colour map, so label PNGs open with VOC colours anywhere."""

from __future__ import annotations

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(n: int = 256) -> list[list[int]]:
    """The VOC colour map: the bits of the class id interleaved into R, G and B from the top."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


def pil_palette(colors: list[list[int]]) -> list[int]:
    """A flat 768-entry list for Image.putpalette: the classes' colours, then VOC's for the rest
    (so 255 = ignore shows as VOC's cream border colour)."""
    full = [list(c) for c in colors] + voc_palette()[len(colors) :]
    return [v for rgb in full[:256] for v in rgb]


def palette_array(colors: list[list[int]]) -> np.ndarray:
    """256x3 uint8 lookup table from label id to colour."""
    return np.asarray(pil_palette(colors), dtype=np.uint8).reshape(256, 3)
