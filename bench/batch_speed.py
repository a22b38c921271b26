"""segserve batch against bare session.run (docs/benchmarks.md, "segserve batch"): the same
images, decoded once, run through the same engine and arithmetic with nothing around it,
then the whole job (read, decode, segment, encode, write, manifest) on its engine, in one
run. Images: synthetic samples of 128-512 px and every twentieth a 1080x1440 mosaic
(above one tile, so it runs in tiles, as /segment runs it).

    python -m bench.batch_speed --images 2000 --out docs/bench   (make bench-batch)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.default_model import NAME, install
from segserve.service.media.imaging import decode_image
from segserve.service.predict import Predictor, segment
from segserve.service.settings import Settings
from segserve.training.provenance import cpu_name
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, render_mosaic, render_sample

ROOT = Path(__file__).resolve().parent.parent


def make_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return
    small = SynthConfig(count=10**6, seed=77, min_size=128, max_size=512)
    large = SynthConfig(count=10**6, seed=78, **DEFAULT_MODEL_SET)
    for i in range(count):
        if i % 20 == 19:
            rgb, _, _ = render_mosaic(large, (1080, 1440), first=i)
            Image.fromarray(rgb).save(folder / f"m{i:05d}.jpg", quality=90)
        else:
            image, _ = render_sample(small, i)
            image.save(folder / f"s{i:05d}.jpg", quality=90)


def bare(model: Path, images: list[np.ndarray], variant: str, callers: int) -> float:
    """Images/s of the engine alone over decoded images: `callers` at once, each on one
    onnxruntime thread (callers 1: one caller on every core's thread)."""
    threads = 1 if callers > 1 else (os.cpu_count() or 1)
    predictor = Predictor(model, Settings(variant=variant, intra_op_threads=threads))
    engine, plan = predictor.engine, predictor.plan
    segment(engine, images[0], plan)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(lambda rgb: segment(engine, rgb, plan), images))
    return len(images) / (time.perf_counter() - t0)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path(".bench/batch"))
    p.add_argument("--variant", default="float32", help="the arithmetic both sides run")
    p.add_argument("--engines", nargs="+", default=["local", "ray"])
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args()
    folder = args.work / "images"
    make_images(folder, args.images)
    repo = args.work / "repo"
    if not repo.is_dir():
        install(repo)
    model = repo / NAME / "1" / "model.onnx"
    files = sorted(folder.glob("*.jpg"))[: args.images]
    decoded = [decode_image(f.read_bytes(), 10**9) for f in files]
    cores = os.cpu_count() or 1
    figures = {f"bare_{c}_callers": bare(model, decoded, args.variant, c) for c in (1, cores)}
    del decoded
    best = max(figures.values())
    jobs = {}
    for engine in args.engines:
        out = Path(tempfile.mkdtemp(prefix="segserve-batch-"))
        command = [sys.executable, "-m", "segserve.cli", "batch", str(folder), "--model",
                   str(model), "--out", str(out), "--engine", engine, "--variant", args.variant,
                   "--no-progress"]  # fmt: skip
        t0 = time.perf_counter()
        job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        peak = 0  # RSS of the job and every process under it (Ray's raylet and workers)
        while job.poll() is None:
            peak = max(peak, tree_rss(job.pid))
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        assert job.returncode == 0, job.returncode
        line = job.stdout.read().strip().splitlines()[-1]
        jobs[engine] = {
            "wall_s": round(wall, 1),
            "images_per_s": round(len(files) / wall, 3),
            "over_best_bare": round(len(files) / wall / best, 3),
            "peak_rss_mib": round(peak / 2**20),
            "line": line,
        }
        print(engine, jobs[engine], flush=True)
    report = {
        "cpu": cpu_name(), "cores": cores, "date": time.strftime("%Y-%m-%d %H:%M UTC"),
        "images": len(files), "variant": args.variant,
        **{k: round(v, 3) for k, v in figures.items()},
        "jobs": jobs,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
