"""The paper's network at the paper's speed (docs/benchmarks.md, "FCN-8s at the paper's
speed"): FCN-8s served end to end at 500x375, a typical VOC image, once per candidate
runtime x arithmetic and once with `auto`, beside the paper's 175 ms (a K40 GPU, 2015).

    python -m bench.paper_speed --work .bench/paper --out docs/bench   (make bench-paper)

What it builds under --work (once; later runs reuse it):
- FCN-8s (VGG16, 21 classes) with untrained weights: VGG16 as torchvision initialises it,
  the score layers at zero as the paper's are, so every label is background. The speed is
  the network's whatever its weights; its labels and agreements say nothing about quality.
- its int8 file by `segserve quantize`, calibrated on synthetic images (`segserve data
  synth`, 375-500 px; the network has no data of its own);
- a check set of synthetic images (REPO/fcn8s-voc/checkset), so that candidates other than
  float32 may be checked and served at all.

Then per candidate: `segserve serve` with default settings but SEGSERVE_VARIANT, the time
it took to be ready, what /models says serves, p50/p99 at concurrency 1 and req/s at 4 over
one 500x375 JPEG. Names the CPU; writes --out/paper_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench.serving import serving
from segserve import loadgen
from segserve.training.provenance import cpu_name

NAME = "fcn8s-voc"
PAPER_MS = 175
SIZE = (375, 500)  # H, W
CANDIDATES = ("float32", "int8", "openvino-float32", "openvino-bf16", "openvino-int8")


def build(work: Path) -> Path:
    """REPO with FCN-8s v1, its int8 file and a check set (made once)."""
    repo = work / "repo"
    folder = repo / NAME / "1"
    if (folder / "model.int8.onnx").is_file():
        return repo
    import torch

    from segserve.contracts.palette import VOC_CLASSES, voc_palette
    from segserve.export.onnx_export import export_checkpoint
    from segserve.export.quantize import quantize_version
    from segserve.models import build_model
    from segserve.training.checkpoint import checkpoint_fields, save_checkpoint
    from segserve.training.synth import SynthConfig, write_dataset

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model("fcn8s", 21).eval()
    fields = checkpoint_fields(
        model, "fcn8s", {}, list(VOC_CLASSES), voc_palette(21), trained_on="untrained"
    )
    save_checkpoint(work / "fcn8s.pt", **fields)
    if not (folder / "model.onnx").is_file():
        export_checkpoint(work / "fcn8s.pt", repo, NAME, parity_shapes=((1, 96, 128),))
    data = work / "synth"
    if not data.is_dir():
        write_dataset(data, SynthConfig(count=24, seed=2015, min_size=375, max_size=500))
    quantize_version(repo, NAME, 1, data, calibration=16, held_out=8)
    check = repo / NAME / "checkset"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (check / sub).mkdir(parents=True, exist_ok=True)
    val = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:8]
    for i in val:
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            (check / sub / f"{i}.{ext}").write_bytes((data / sub / f"{i}.{ext}").read_bytes())
    (check / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val) + "\n")
    return repo


def serve_and_measure(repo: Path, variant: str, duration: float, log: Path) -> dict:
    with serving(repo, {"SEGSERVE_VARIANT": variant}, log) as server:
        detail = server.detail(NAME)
        images = loadgen.synthetic_images([SIZE], per_size=4)
        target = loadgen.Target(server.url)
        c1, c4 = loadgen.bench(target, [1, 4], duration, images, progress=False)
    choice = detail["variant_choice"]
    return {
        "setting": variant,
        "serving": detail["variant"],
        "reason": choice["reason"],
        "ready_s": round(server.ready_s, 1),
        "load_seconds": choice["load_seconds"],
        "candidates": choice["candidates"],
        "c1": {"p50_ms": c1.p50_ms, "p99_ms": c1.p99_ms, "requests": c1.ok, "errors": c1.errors},
        "c4": {"req_per_s": c4.throughput_rps, "p50_ms": c4.p50_ms, "requests": c4.ok},
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path(".bench/paper"))
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency")
    p.add_argument("--variants", nargs="+", default=["auto", *CANDIDATES])
    args = p.parse_args()
    repo = build(args.work)
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "size": f"{SIZE[1]}x{SIZE[0]}",
        "paper_ms": PAPER_MS,
        "runs": [],
    }
    print(f"FCN-8s at {SIZE[1]}x{SIZE[0]} on {report['cpu']}, {os.cpu_count()} cores")
    print(
        f"{'setting':<18}{'serving':<18}{'ready s':>8}{'p50 ms':>9}{'p99 ms':>9}{'c=4 req/s':>11}"
    )
    for variant in args.variants:
        run = serve_and_measure(repo, variant, args.duration, args.work / f"{variant}.log")
        report["runs"].append(run)
        c1, c4 = run["c1"], run["c4"]
        print(
            f"{variant:<18}{run['serving']:<18}{run['ready_s']:>8.0f}{c1['p50_ms']:>9.0f}"
            f"{c1['p99_ms']:>9.0f}{c4['req_per_s']:>11.2f}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
