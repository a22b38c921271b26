"""The default model, `unet-shapes`, as it ships: one exported version (model.onnx with its
card inside, model.json beside it, and its int8 variant model.int8.onnx) in this package, so that a new repository serves at once
and `pip install segserve` users get it too. Torch-free: installing it is a copy.

How it was made (commit, command, machine, arithmetic, time, val metrics per class) is in
its card's `provenance` and `metrics`; `segserve bootstrap` makes it again from scratch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from segserve.contracts.repository import CARD_FILE, MODEL_FILE, publishing, variant_paths, walk

NAME = "unet-shapes"
VERSION = 1
FILES = Path(__file__).resolve().parent  # model.onnx and model.json


def install(repository: Path) -> Path | None:
    """Put the shipped version into `repository` when it holds no model yet; returns the
    version folder, or None when there was a model already (nothing is touched then)."""
    repository = Path(repository)
    if next(walk(repository), None) is not None:
        print(f"{repository} already holds a model; nothing to install")
        return None
    if not (FILES / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"the shipped model is missing from {FILES}: reinstall segserve, or rebuild it "
            "with `segserve bootstrap`"
        )
    with publishing(repository, NAME, VERSION) as folder:
        for source in (FILES / MODEL_FILE, FILES / CARD_FILE, *variant_paths(FILES).values()):
            shutil.copyfile(source, folder / source.name)
    target = repository / NAME / str(VERSION)
    print(f"installed the shipped {NAME} v{VERSION} into {target}")
    check = write_check_set(repository / NAME)
    print(f"wrote its check set ({CHECK_SET_IMAGES} labelled images) into {check}")
    return target


# The default model's check set (service/runtime/gate.py): fresh samples of its data, from a
# seed no training or test used (training: 0), written by `segserve init` rather than shipped
# (the repository's binaries are the model files).
CHECK_SET_SEED = 9001
CHECK_SET_IMAGES = 40


def write_check_set(model_dir: Path) -> Path:
    """REPO/unet-shapes/checkset: CHECK_SET_IMAGES labelled images in VOC layout (val.txt),
    written whole into a hidden folder first, then renamed (a server never reads half)."""
    from segserve.training.synth import DEFAULT_MODEL_SET, JPEG_QUALITY, SynthConfig, render_sample

    target = Path(model_dir) / "checkset"
    if target.exists():
        return target
    tmp = Path(model_dir) / ".checkset-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True)
    config = SynthConfig(count=CHECK_SET_IMAGES, seed=CHECK_SET_SEED, **DEFAULT_MODEL_SET)
    ids = []
    for i in range(CHECK_SET_IMAGES):
        image, labels = render_sample(config, i)
        ids.append(f"check_{i:04d}")
        image.save(tmp / "JPEGImages" / f"{ids[-1]}.jpg", quality=JPEG_QUALITY)
        labels.save(tmp / "SegmentationClass" / f"{ids[-1]}.png")
    (tmp / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    tmp.rename(target)
    return target
