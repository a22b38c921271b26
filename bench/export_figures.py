"""Export figures for docs/benchmarks.md: file size, export time, parity, and the CPU time of
one 512x512 image with and without graph optimisation, for FCN-8s (21 classes) and U-Net
width 16. Untrained weights: sizes and times do not depend on training.

    python -m bench.export_figures --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from segserve.contracts.palette import VOC_CLASSES, voc_palette
from segserve.export.onnx_export import export_checkpoint
from segserve.models import build_model
from segserve.training.checkpoint import checkpoint_fields, save_checkpoint


def checkpoint(path: Path, arch: str, **opts) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, 21, **opts).eval()
    fields = checkpoint_fields(
        model, arch, opts, list(VOC_CLASSES), voc_palette(21), trained_on="untrained"
    )
    save_checkpoint(path, **fields)
    return path


def run_time(path: Path, level: ort.GraphOptimizationLevel, runs: int = 5) -> tuple[float, float]:
    """(session creation s, mean ms of one 1x3x512x512 run)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32)
    session.run(None, {"image": x})
    t0 = time.perf_counter()
    for _ in range(runs):
        session.run(None, {"image": x})
    return created, 1000 * (time.perf_counter() - t0) / runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, arch, opts in (
            ("fcn8s-21", "fcn8s", {}),
            ("unet16-21", "unet", {"width": 16, "batch_norm": True}),
        ):
            ckpt = checkpoint(tmp / f"{name}.pt", arch, **opts)
            row = {}
            for optimize in (True, False):
                result = export_checkpoint(
                    ckpt,
                    tmp / "repo",
                    f"{name}-{'opt' if optimize else 'raw'}",
                    optimize=optimize,
                    log=lambda *_: None,
                )
                key = "offline_basic" if optimize else "raw"
                row[key] = {
                    "file_mb": result.file_bytes / 1e6,
                    "export_s": result.export_s,
                    "max_abs_diff": result.parity.max_abs_diff,
                    "agreement": result.parity.agreement,
                }
                for level_name, level in (
                    ("session_all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                    ("session_none", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                ):
                    created, ms = run_time(result.path, level)
                    row[key][f"{level_name}_create_s"] = created
                    row[key][f"{level_name}_512_ms"] = ms
                print(name, key, json.dumps(row[key]), flush=True)
            figures[name] = row
    (args.out / "export_figures.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
