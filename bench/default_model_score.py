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

from segserve.service.runtime.engine import Engine
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig
from segserve.training.synth_score import score_segmenter


def score(model: Path, count: int, seed: int, sizes: dict) -> dict:
    engine = Engine.load(model, "cpu", 2)

    def segment(jpeg: bytes) -> np.ndarray:
        (labels,) = engine.segment([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))])
        return labels

    return score_segmenter(segment, SynthConfig(count=count, seed=seed, **sizes))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="a model.onnx")
    p.add_argument("--count", type=int, default=150)
    p.add_argument("--seed", type=int, default=4242, help="not a training seed (that is 0)")
    p.add_argument(
        "--generator-default",
        action="store_true",
        help="the generator's default images (160-512 px, up to 8 objects) instead of the "
        "default model's own (128-192 px)",
    )
    args = p.parse_args()
    sizes = {} if args.generator_default else DEFAULT_MODEL_SET
    print(json.dumps(score(args.model, args.count, args.seed, sizes), indent=2))


if __name__ == "__main__":
    main()
