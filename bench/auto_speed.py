"""`auto` against float32, served (docs/benchmarks.md, "Runtimes and arithmetics"): the
shipped default model behind `segserve serve` with SEGSERVE_VARIANT=auto and =float32 in
turn (alternating, --pairs times), mixed-size /segment traffic at concurrency 8, req/s and
latency of each, what auto chose and why, and its mean IU on fresh images against
float32's (both through the same server, so what serves is what is scored).

    python -m bench.auto_speed --out docs/bench [--duration 40 --pairs 2]   (make bench-auto)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.serving import serving
from segserve import loadgen
from segserve.default_model import NAME, install
from segserve.training.metrics import ConfusionMatrix, segmentation_scores
from segserve.training.provenance import cpu_name
from segserve.training.synth import DEFAULT_MODEL_SET, SYNTH_CLASSES, SynthConfig, render_sample

SIZES = [(256, 256), (375, 500), (512, 512), (768, 1024)]
FRESH_SEED = 20261207  # no run trained or checked on it


def held_out_mean_iu(url: str, images: int) -> float:
    """Mean IU of what the server answers on fresh samples of the model's distribution."""
    config = SynthConfig(count=10**6, seed=FRESH_SEED, **DEFAULT_MODEL_SET)
    matrix = ConfusionMatrix(len(SYNTH_CLASSES))
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(images):
            image, target = render_sample(config, i)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=92)
            r = client.post(
                "/segment", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"}
            )
            r.raise_for_status()
            matrix.update(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(target))
    return float(segmentation_scores(matrix.matrix)["mean_iu"])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--held-out", type=int, default=60, help="fresh images scored per server")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segserve-auto-"))
    install(work / "repo")
    images = loadgen.synthetic_images(SIZES, per_size=4)
    runs = []
    for variant in ["auto", "float32"] * args.pairs:
        with serving(work / "repo", {"SEGSERVE_VARIANT": variant}, work / "log") as server:
            detail = server.detail(NAME)
            mean_iu = held_out_mean_iu(server.url, args.held_out)
            (stats,) = loadgen.bench(
                loadgen.Target(server.url), [args.concurrency], args.duration, images,
                progress=False, server_pid=server.pid,
            )  # fmt: skip
        runs.append({
            "setting": variant, "serving": detail["variant"],
            "reason": detail["variant_choice"]["reason"], "ready_s": round(server.ready_s, 1),
            "load_seconds": detail["variant_choice"]["load_seconds"],
            "req_per_s": stats.throughput_rps, "p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms,
            "server_cpu_ms_per_request": stats.server_cpu_ms_per_request,
            "held_out_mean_iu": mean_iu,
        })  # fmt: skip
        r = runs[-1]
        print(
            f"{variant:<8} serving {r['serving']:<17} {r['req_per_s']:6.2f} req/s  p50 "
            f"{r['p50_ms']:6.0f} ms  p99 {r['p99_ms']:6.0f} ms  mean IU {mean_iu:.4f}",
            flush=True,
        )
    auto = [r["req_per_s"] for r in runs if r["setting"] == "auto"]
    plain = [r["req_per_s"] for r in runs if r["setting"] == "float32"]
    ratios = [a / f for a, f in zip(auto, plain, strict=True)]
    report = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sizes": [f"{h}x{w}" for h, w in SIZES],
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "runs": runs,
        "auto_over_float32": {"pairs": ratios, "median": statistics.median(ratios)},
    }
    print(f"auto / float32 req/s: {', '.join(f'{x:.2f}' for x in ratios)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
