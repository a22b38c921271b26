"""INT8 vs float32 for the shipped default model (docs/benchmarks.md, "INT8 variants"):

    python -m bench.int8 quality [--images 150]   both variants on fresh samples
    python -m bench.int8 speed [--rounds 5]       bare session.run, alternating rounds

`quality`: mean IU of each variant on fresh samples of the default model's distribution
(a seed no run trained on), their per-class IU, and the share of pixels where the two agree.
`speed`: median seconds of one run at 512x512, a batch of four 256x256 and 1024x768, each
variant in turn, `--rounds` rounds (after one untimed run of each shape), two threads.
Both write JSON under --out (docs/bench) and name the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segserve.default_model import FILES
from segserve.training.metrics import ConfusionMatrix, segmentation_scores
from segserve.training.provenance import cpu_name
from segserve.training.synth import DEFAULT_MODEL_SET, SYNTH_CLASSES, SynthConfig, render_sample

VARIANTS = {"float32": FILES / "model.onnx", "int8": FILES / "model.int8.onnx"}
FRESH_SEED = 20261203


def sessions(threads: int = 2) -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return {
        name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for name, path in VARIANTS.items()
    }


def quality(images: int) -> dict:
    config = SynthConfig(count=10**6, seed=FRESH_SEED, **DEFAULT_MODEL_SET)
    runs = sessions()
    matrices = {name: ConfusionMatrix(len(SYNTH_CLASSES)) for name in runs}
    same = total = 0
    for i in range(images):
        image, target = render_sample(config, i)
        rgb, truth = np.asarray(image), np.asarray(target)
        labels = {n: s.run(None, {"image": rgb[None]})[0][0] for n, s in runs.items()}
        for name, lab in labels.items():
            matrices[name].update(lab, truth)
        same += int((labels["float32"] == labels["int8"]).sum())
        total += truth.size
    scores = {n: segmentation_scores(m.matrix) for n, m in matrices.items()}
    return {
        "images": images,
        "seed": FRESH_SEED,
        "agreement": same / total,
        "mean_iu": {n: float(s["mean_iu"]) for n, s in scores.items()},
        "per_class_iu": {
            n: dict(zip(SYNTH_CLASSES, map(float, s["per_class_iu"]), strict=True))
            for n, s in scores.items()
        },
    }


def speed(rounds: int) -> dict:
    rng = np.random.default_rng(0)
    cases = {
        "512x512": rng.integers(0, 256, (1, 512, 512, 3), np.uint8),
        "4x256x256": rng.integers(0, 256, (4, 256, 256, 3), np.uint8),
        "1024x768": rng.integers(0, 256, (1, 768, 1024, 3), np.uint8),
    }
    runs = sessions()
    for s in runs.values():
        for x in cases.values():
            s.run(None, {"image": x})
    times: dict[str, dict[str, list[float]]] = {c: {n: [] for n in runs} for c in cases}
    for _ in range(rounds):
        for case, x in cases.items():
            for name, s in runs.items():
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                times[case][name].append(time.perf_counter() - t0)
    out = {}
    for case, by in times.items():
        med = {n: statistics.median(t) for n, t in by.items()}
        out[case] = {"seconds": med, "float32_over_int8": med["float32"] / med["int8"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("quality", "speed"))
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    result = quality(args.images) if args.what == "quality" else speed(args.rounds)
    result = {"cpu": cpu_name(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int8_{args.what}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
