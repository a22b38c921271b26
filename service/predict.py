"""`segserve predict`: run a model file on images without a server, through the same
decode / preprocess / postprocess code as the service."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segserve.contracts.card import ModelCard
from segserve.service.imaging import (
    decode_image,
    encode_label_png,
    encode_rgb,
    labels_from_output,
    overlay,
    preprocess,
)


def predict_files(
    images: list[Path], model: Path, out: Path, fmt: str = "png", max_pixels: int = 40_000_000
) -> list[Path]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        rgb = decode_image(Path(path).read_bytes(), max_pixels)
        h, w = rgb.shape[:2]
        batch = preprocess([rgb], card.mean, card.std, card.input_dtype)
        labels = labels_from_output(session.run(None, {"image": batch})[0])[0, :h, :w]
        if fmt == "overlay":
            target = out / f"{Path(path).stem}_overlay.png"
            target.write_bytes(encode_rgb(overlay(rgb, labels, card.palette)))
        else:
            target = out / f"{Path(path).stem}.png"
            target.write_bytes(encode_label_png(labels, card.palette))
        written.append(target)
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=card.num_classes))
        print(
            f"{path} -> {target}  ({w}x{h}; classes: {', '.join(card.class_names[i] for i in present)})"
        )
    return written
