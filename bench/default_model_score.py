"""The default model scored as it is served: its ONNX file through segserve's own Engine on
synthetic images drawn from a seed no training run used (JPEG-encoded as the data set stores
them), with the paper's four metrics, the IU of each class and the border rule: background
pixels within 4 px of the image border that the model calls some other class.

    python -m bench.default_model_score --model segserve/default_model/model.onnx --count 150
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.service.engine import Engine
from segserve.training.metrics import ConfusionMatrix, border_background_errors, segmentation_scores
from segserve.training.synth import DEFAULT_MODEL_SET, SYNTH_CLASSES, SynthConfig, render_sample


def score(model: Path, count: int, seed: int, sizes: dict) -> dict:
    engine = Engine.load(model, "cpu", 2)
    config = SynthConfig(count=count, seed=seed, **sizes)
    cm = ConfusionMatrix(len(SYNTH_CLASSES))
    wrong = background = 0
    for i in range(count):
        image, truth = render_sample(config, i)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        rgb = np.asarray(Image.open(buffer).convert("RGB"))
        (pred,) = engine.segment([rgb])
        target = np.asarray(truth)
        cm.update(pred, target)
        w, b = border_background_errors(pred, target)
        wrong, background = wrong + w, background + b
    scores = segmentation_scores(cm.matrix)
    return {
        "images": count, "seed": seed, **{k: scores[k] for k in
        ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")},
        "per_class_iu": dict(zip(SYNTH_CLASSES, scores["per_class_iu"], strict=True)),
        "border_background_wrong": wrong / max(background, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="a model.onnx")
    p.add_argument("--count", type=int, default=150)
    p.add_argument("--seed", type=int, default=4242, help="not a training seed (that is 0)")
    p.add_argument(
        "--generator-default", action="store_true",
        help="the generator's default images (160-512 px, up to 8 objects) instead of the "
        "default model's own (128-192 px)",
    )  # fmt: skip
    args = p.parse_args()
    sizes = {} if args.generator_default else DEFAULT_MODEL_SET
    print(json.dumps(score(args.model, args.count, args.seed, sizes), indent=2))


if __name__ == "__main__":
    main()
