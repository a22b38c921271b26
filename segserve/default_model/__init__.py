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
    return target
