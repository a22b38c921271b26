"""What onnxruntime's CPU arena is worth: bare `session.run` over a mix of photo sizes with
the arena off, on (never shrunk: onnxruntime's default), and on with segserve's shrink after
runs of `--shrink-pixels` or more. Each setting in its own process, so RSS is its own.

Without the arena every run maps its activations afresh and the kernel faults every page in
(and zeroes it); with it, runs reuse the memory. The second mix adds a 1000x1000 image: the
run that would leave the arena at its peak for good.

    python -m bench.arena --repository model_repository --model unet-shapes --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "off": {"cpu_arena": False},
    "on, never shrunk": {"cpu_arena": True, "arena_shrink_pixels": None},
    "on, shrunk after large runs": {"cpu_arena": True},
}
MIX = [(480, 640), (500, 375), (512, 512), (384, 512), (600, 400)]


def measure(model: Path, setting: str, seconds: float, large: bool, shrink_pixels: int) -> dict:
    """In this process: megapixels/s, page faults per image and RSS after, for one setting.
    Runs in a thread of its own, as the service's batcher does (glibc gives threads their
    own heaps, which matters to what `malloc` maps afresh)."""
    from bench.compare import peak_rss_mb
    from segserve.service.runtime.engine import Engine

    options = dict(SETTINGS[setting])
    if "arena_shrink_pixels" not in options and options["cpu_arena"]:
        options["arena_shrink_pixels"] = shrink_pixels
    engine = Engine.load(model, "cpu", os.cpu_count() or 1, **options)
    rng = np.random.default_rng(0)
    sizes = MIX + ([(1000, 1000)] if large else [])
    batches = [
        engine.stack([engine.prepare(rng.integers(0, 256, (h, w, 3), np.uint8))]) for h, w in sizes
    ]
    result: dict = {}

    def work() -> None:
        for b, s in zip(batches, sizes, strict=True):  # warm-up: every shape once
            engine.run(b, [s])
        r0, start, images, pixels = (
            resource.getrusage(resource.RUSAGE_SELF),
            time.perf_counter(),
            0,
            0,
        )
        while time.perf_counter() - start < seconds:
            for b, s in zip(batches, sizes, strict=True):
                engine.run(b, [s])
                images, pixels = images + 1, pixels + s[0] * s[1]
        elapsed, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        result.update(
            megapixels_per_s=pixels / elapsed / 1e6,
            images_per_s=images / elapsed,
            faults_per_image=(r1.ru_minflt - r0.ru_minflt) / images,
            cpu_ms_per_image=1000
            * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            / images,
        )

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    rss, peak = peak_rss_mb(os.getpid())
    return {**result, "rss_after_mb": rss, "peak_rss_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="unet-shapes")
    p.add_argument("--seconds", type=float, default=10.0, help="per setting and mix")
    p.add_argument("--rounds", type=int, default=2, help="every setting this often, interleaved")
    from segserve.service.settings import ARENA_SHRINK_PIXELS

    p.add_argument(
        "--shrink-pixels", type=int, default=ARENA_SHRINK_PIXELS, help="default: segserve's"
    )
    p.add_argument("--one", nargs=2, metavar=("SETTING", "LARGE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    from segserve.contracts.repository import walk

    entry = [e for e in walk(args.repository) if e.name == args.model][-1]
    if args.one:
        setting, large = args.one
        row = measure(entry.model_path, setting, args.seconds, large == "1", args.shrink_pixels)
        print(json.dumps(row))
        return
    print(
        f"{'mix':<22}{'arena':<30}{'MP/s':>7}{'img/s':>7}{'faults/img':>12}"
        f"{'CPU ms/img':>12}{'RSS after':>11}{'peak':>7}"
    )
    for large in ("0", "1"):
        for _ in range(args.rounds):
            for setting in SETTINGS:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.arena",
                        "--repository",
                        str(args.repository),
                        "--model",
                        args.model,
                        "--seconds",
                        str(args.seconds),
                        "--shrink-pixels",
                        str(args.shrink_pixels),
                        "--one",
                        setting,
                        large,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                mix = "5 photo sizes" + (" + 1 MP" if large == "1" else "")
                print(
                    f"{mix:<22}{setting:<30}{r['megapixels_per_s']:>7.3f}{r['images_per_s']:>7.2f}"
                    f"{r['faults_per_image']:>12.0f}{r['cpu_ms_per_image']:>12.0f}"
                    f"{r['rss_after_mb']:>9.0f}MB{r['peak_rss_mb']:>5.0f}MB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
