"""Side by side, on one machine and in one run, for one model and the same images:

1. the limit: bare onnxruntime `session.run` in a loop (batch 1 and the best batch size),
2. segserve over HTTP at concurrency 1, 4, 16, 64 (and with batching off),
3. the naive baseline (bench/naive_server.py: FastAPI + eager PyTorch, one at a time),

then the ratios, the cost against image size and batch size, and peak server memory.

    python -m bench.compare --repository model_repository --model unet-shapes \\
        --checkpoint runs/unet-shapes/best.pt --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from segserve import loadgen
from segserve.contracts.repository import walk
from segserve.service.media.imaging import decode_image
from segserve.service.runtime.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def time_session(
    engine: Engine, images: list[np.ndarray], seconds: float, min_runs: int = 3
) -> float:
    """Mean seconds per session.run on `images` as one batch (after one warm-up run)."""
    batch = engine.stack([engine.prepare(im) for im in images])
    sizes = [im.shape[:2] for im in images]
    engine.run(batch, sizes)
    runs, start = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        engine.run(batch, sizes)
        runs += 1
    return (time.perf_counter() - start) / runs


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


SEGSERVE = [sys.executable, "-m", "segserve.cli", "serve"]
NAIVE = [sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--log-level", "warning"]


@contextmanager
def running(
    cmd: list[str], port: int, env: dict, log: Path, up: str = "/metrics", timeout_s: float = 180
) -> Iterator[subprocess.Popen]:
    """A server process on `port`, up (its `up` path answers within `timeout_s`) for the
    block, then stopped."""
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        loadgen.wait_until_up(f"http://127.0.0.1:{port}{up}", proc, timeout_s, log)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="unet-shapes")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("runs/unet-shapes/best.pt"),
        help="for the naive PyTorch baseline",
    )
    p.add_argument("--size", default="512x512")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--scaling-sizes", default="256x256,512x512,1024x1024,2048x2048")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    h, w = (int(v) for v in args.size.split("x"))
    images = loadgen.synthetic_images([(h, w)], per_size=8)
    report: dict = {
        "machine": f"{platform.node()} {platform.machine()} {threads} cores",
        "model": args.model,
        "size": args.size,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }

    # 1. The limit: bare session.run.
    newest = [e for e in walk(args.repository) if e.name == args.model][-1]
    engine = Engine.load(newest.model_path, "cpu", threads)
    rgb = decode_image(images[0].data, 10**9)
    bare = {}
    for n in (1, 2, 4, 8):
        s = time_session(engine, [rgb] * n, 5.0)
        bare[n] = {"ms_per_run": 1000 * s, "images_per_s": n / s}
        print(f"bare session.run batch {n}: {1000 * s:.1f} ms/run, {n / s:.2f} img/s", flush=True)
    best_batch = max(bare, key=lambda n: bare[n]["images_per_s"])
    report["bare"] = {"by_batch": bare, "best_batch": best_batch}

    scaling = {}
    for size in args.scaling_sizes.split(","):
        sh, sw = (int(v) for v in size.split("x"))
        img = (np.random.default_rng(0).random((sh, sw, 3)) * 255).astype(np.uint8)
        s = time_session(engine, [img], 3.0, min_runs=2)
        scaling[size] = {"ms_per_image": 1000 * s, "megapixels_per_s": sh * sw / s / 1e6}
        print(f"bare session.run {size}: {1000 * s:.1f} ms", flush=True)
    report["bare_by_size"] = scaling
    del engine

    # 2. segserve over HTTP.
    port = 18000 + os.getpid() % 1000
    env = {
        "SEGSERVE_REPOSITORY": str(args.repository),
        "SEGSERVE_DEFAULT_MODEL": args.model,
        "SEGSERVE_INTRA_OP_THREADS": str(threads),
    }
    log, url = args.out / "segserve.log", f"http://127.0.0.1:{port}"
    with running(SEGSERVE, port, env, log) as proc:
        rss_idle = peak_rss_mb(proc.pid)
        results = loadgen.bench(loadgen.Target(url), args.concurrency, args.duration, images)
        rss_load = peak_rss_mb(proc.pid)
    print(loadgen.format_table(results), flush=True)
    title = f"segserve {args.model} {args.size} CPU"
    loadgen.plot(results, args.out / "segserve_concurrency.png", title=title)
    report["segserve"] = [r.__dict__ for r in results]
    report["segserve_rss_mb"] = {"after_load_idle": rss_idle[0], "peak_under_load": rss_load[1]}

    with running(SEGSERVE, port, {**env, "SEGSERVE_MAX_BATCH_SIZE": "1"}, log):
        off = loadgen.bench(loadgen.Target(url), [16], args.duration, images)
    report["segserve_batching_off"] = [r.__dict__ for r in off]
    print("batching off:\n" + loadgen.format_table(off), flush=True)

    # 3. The naive baseline.
    naive_env = {"NAIVE_CHECKPOINT": str(args.checkpoint), "OMP_NUM_THREADS": str(threads)}
    with running(NAIVE, port, naive_env, args.out / "naive.log") as proc:
        naive_idle = peak_rss_mb(proc.pid)
        naive = loadgen.bench(loadgen.Target(url), [1, 4, 16], args.duration, images)
        naive_peak = peak_rss_mb(proc.pid)
    print("naive:\n" + loadgen.format_table(naive), flush=True)
    report["naive"] = [r.__dict__ for r in naive]
    report["naive_rss_mb"] = {"after_load_idle": naive_idle[0], "peak_under_load": naive_peak[1]}

    # Ratios.
    best_http = max(results, key=lambda r: r.throughput_rps)
    best_naive = max(naive, key=lambda r: r.throughput_rps)
    c1 = next(r for r in results if r.concurrency == 1)
    report["ratios"] = {
        "segserve_over_bare_throughput": best_http.throughput_rps
        / bare[best_batch]["images_per_s"],
        "segserve_p50_c1_minus_bare_ms": c1.p50_ms - bare[1]["ms_per_run"],
        "segserve_over_naive_throughput": best_http.throughput_rps / best_naive.throughput_rps,
        "segserve_p50_c1_ms": c1.p50_ms,
        "bare_batch1_ms": bare[1]["ms_per_run"],
    }
    print(json.dumps(report["ratios"], indent=2))
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
