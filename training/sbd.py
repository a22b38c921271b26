"""The paper's training data: SBD (Hariharan et al., "Semantic contours from inverse
detectors", 2011) read from its own folder, and the paper's split written in VOC layout.

SBD (benchmark_RELEASE/dataset/): img/ID.jpg, cls/ID.mat (a MATLAB struct GTcls whose
Segmentation field is the H x W class map, 0..20, no ignore band), train.txt (8,498 ids),
val.txt (2,857). SBD's images come from VOC2011, and SBD train overlaps VOC's segmentation
val, so training on SBD and validating on VOC val needs the overlap removed:

- train: SBD train minus every image of the VOC folder's segmentation val list;
- val: the VOC folder's segmentation val minus SBD train. With VOC2011 that is exactly
  seg11valid, the paper's 736 validation images (fcn.berkeleyvision.org data/pascal/
  seg11valid.txt); `--val-list` takes that file to use with a VOC2012 folder.

Nothing is downloaded: both folders are local, as users fetch them under their own licences.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.contracts.palette import pil_palette, voc_palette
from segserve.errors import UserError
from segserve.training.datasets import find_voc_root

NUM_VOC_CLASSES = 21


class SBDError(UserError, ValueError):
    """An SBD or VOC folder that is missing, incomplete or malformed."""


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise SBDError(f"missing {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_sbd_label(path: Path) -> np.ndarray:
    """The class map of one SBD .mat file as uint8 (H, W)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
        label = np.asarray(mat["GTcls"].Segmentation)
    except (OSError, KeyError, AttributeError, ValueError, TypeError) as exc:
        raise SBDError(f"{path}: not an SBD cls file ({exc.__class__.__name__}: {exc})") from exc
    if label.ndim != 2 or label.size == 0 or label.min() < 0 or label.max() >= NUM_VOC_CLASSES:
        raise SBDError(f"{path}: Segmentation is not an H x W map of classes 0..20")
    return label.astype(np.uint8)


def paper_split(sbd_train: list[str], voc_val: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): SBD train without VOC val images, and VOC val without SBD train ones."""
    val_set, train_set = set(voc_val), set(sbd_train)
    return [i for i in sbd_train if i not in val_set], [i for i in voc_val if i not in train_set]


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(src, dst)


def write_paper_split(
    sbd: Path, voc: Path, out: Path, link: bool = True, val_list: Path | None = None
) -> dict[str, int]:
    """Write the paper's train/val split as one VOC-layout folder; returns the counts."""
    sbd, out = Path(sbd), Path(out)
    if (sbd / "dataset" / "cls").is_dir():
        sbd = sbd / "dataset"  # benchmark_RELEASE/ given instead of dataset/
    for sub in ("cls", "img"):
        if not (sbd / sub).is_dir():
            raise SBDError(f"{sbd} is not SBD's dataset/ folder: no {sub}/")
    try:
        voc_root = find_voc_root(voc)
    except ValueError as exc:
        raise SBDError(str(exc)) from exc
    sbd_train = read_ids(sbd / "train.txt")
    voc_val = read_ids(val_list or voc_root / "ImageSets" / "Segmentation" / "val.txt")
    train, val = paper_split(sbd_train, voc_val)

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = pil_palette(voc_palette(NUM_VOC_CLASSES))
    for image_id in train:
        label = Image.fromarray(read_sbd_label(sbd / "cls" / f"{image_id}.mat"), "P")
        label.putpalette(palette)
        label.save(out / "SegmentationClass" / f"{image_id}.png")
        _place(sbd / "img" / f"{image_id}.jpg", out / "JPEGImages" / f"{image_id}.jpg", link)
    for image_id in val:
        for folder, ext in (("SegmentationClass", "png"), ("JPEGImages", "jpg")):
            src = voc_root / folder / f"{image_id}.{ext}"
            if not src.is_file():
                raise SBDError(f"missing {src}")
            _place(src, out / folder / f"{image_id}.{ext}", link)
    (out / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (out / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return {
        "sbd train": len(sbd_train),
        "voc val": len(voc_val),
        "train (sbd train - voc val)": len(train),
        "val (voc val - sbd train)": len(val),
    }
