"""A PASCAL VOC-layout segmentation data set: a real VOC2012 folder reads unchanged.

ROOT/JPEGImages/ID.jpg
ROOT/SegmentationClass/ID.png       (palette PNG, values are class ids, 255 = ignore)
ROOT/ImageSets/Segmentation/{train,val}.txt
ROOT/classes.json                   (optional: class_names and palette; VOC's otherwise)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.contracts.palette import IGNORE_LABEL, VOC_CLASSES, voc_palette
from segserve.errors import UserError


class DatasetError(UserError, ValueError):
    """A data folder that is missing, incomplete or malformed."""


def find_voc_root(root: Path) -> Path:
    """Accept the VOC root itself or the folder above it (VOCdevkit/VOC2012)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DatasetError(
        f"{root} is not a VOC-layout folder: expected ImageSets/Segmentation/, JPEGImages/ and "
        "SegmentationClass/ (make one with `segserve data synth --out DIR`)"
    )


def read_class_info(root: Path) -> tuple[list[str], list[list[int]]]:
    """Class names and palette from classes.json, or PASCAL VOC's 21 classes."""
    meta_path = Path(root) / "classes.json"
    if not meta_path.exists():
        return list(VOC_CLASSES), voc_palette(len(VOC_CLASSES))
    try:
        meta = json.loads(meta_path.read_text())
        names = [str(n) for n in meta["class_names"]]
        palette = [[int(v) for v in c] for c in meta.get("palette", voc_palette(len(names)))]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{meta_path} is malformed: {exc}") from exc
    if len(palette) < len(names) or not names:
        raise DatasetError(f"{meta_path}: {len(names)} class names but {len(palette)} colours")
    return names, palette


class VOCSegmentation:
    """Image/label pairs of one split; `transforms(image, target)` sees PIL images."""

    def __init__(
        self, root: str | Path, split: str = "train", transforms: Callable | None = None
    ) -> None:
        self.root = find_voc_root(Path(root))
        self.split = split
        self.transforms = transforms
        self.class_names, self.palette = read_class_info(self.root)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt"))
            raise DatasetError(
                f"no split {split!r} in {self.root} (found: {', '.join(available) or 'none'})"
            )
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"{split_file} lists no images")
        missing = [
            i
            for i in self.ids
            if not (self.root / "JPEGImages" / f"{i}.jpg").is_file()
            or not (self.root / "SegmentationClass" / f"{i}.png").is_file()
        ]
        if missing:
            raise DatasetError(
                f"{len(missing)} of {len(self.ids)} images in {split_file.name} lack a JPEGImages/ID.jpg "
                f"or SegmentationClass/ID.png, e.g. {missing[0]!r}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        image_id = self.ids[index]
        image = Image.open(self.root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        target = Image.open(self.root / "SegmentationClass" / f"{image_id}.png")
        if target.mode not in ("P", "L"):
            raise DatasetError(
                f"label {image_id}.png is mode {target.mode}, expected a palette (P) or L PNG of class ids"
            )
        if target.size != image.size:
            raise DatasetError(f"label {image_id}.png is {target.size}, its image {image.size}")
        labels = np.asarray(target)
        bad = (labels >= self.num_classes) & (labels != IGNORE_LABEL)
        if bad.any():
            raise DatasetError(
                f"label {image_id}.png holds class id {int(labels[bad].max())}, but the data set has "
                f"{self.num_classes} classes"
            )
        return image, target

    def class_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixels of each class over the split, pixels of the images each class is in),
        ignore excluded: what median frequency balancing needs."""
        pixels = np.zeros(self.num_classes, np.int64)
        present_in = np.zeros(self.num_classes, np.int64)
        for image_id in self.ids:
            labels = np.asarray(Image.open(self.root / "SegmentationClass" / f"{image_id}.png"))
            counts = np.bincount(labels.ravel(), minlength=256)[: self.num_classes]
            pixels += counts
            present_in[counts > 0] += int(counts.sum())
        return pixels, present_in

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target
