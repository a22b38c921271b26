"""`segserve predict`: a model file on image files, no server, through the service's own
decode, engine and encode code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segserve.service.engine import Engine
from segserve.service.imaging import decode_image, encode_label_png, encode_rgb, overlay


def predict_files(
    images: list[Path], model: Path, out: Path, fmt: str = "png", max_pixels: int = 40_000_000
) -> list[Path]:
    engine = Engine.load(model, providers="cpu")
    card = engine.card
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        rgb = decode_image(Path(path).read_bytes(), max_pixels)
        (labels,) = engine.segment([rgb])
        if fmt == "overlay":
            target = out / f"{Path(path).stem}_overlay.png"
            target.write_bytes(encode_rgb(overlay(rgb, labels, card.palette)))
        else:
            target = out / f"{Path(path).stem}.png"
            target.write_bytes(encode_label_png(labels, card.palette))
        written.append(target)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=card.num_classes))
        h, w = labels.shape
        names = ", ".join(card.class_names[i] for i in present)
        print(f"{path} -> {target}  ({w}x{h}; classes: {names})")
    return written
