"""A 40 MP image at its own resolution (docs/benchmarks.md, "Overlap-tile inference"): the
shipped default model served by `segserve serve` with its default settings, in one run:

1. the image alone: seconds, seconds per megapixel, tiles, and the server's peak RSS
   (VmHWM: the most it ever held, start-up and warm-up included);
2. the same image again while clients send 256x256 images beside it: their latencies
   (p50, p99, max) and the large image's seconds;
3. the limit: bare `session.run` (segserve's Engine, no server) over the very tiles the
   server ran, one at a time as the server's window runs them on CPU, and stitched.

    python -m bench.large_image [--megapixels 40] [--clients 2] [--out docs/bench]

The image: fresh samples of the default model's distribution laid side by side at their own
size (training.synth.render_mosaic), JPEG at the data set's quality.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from segserve.default_model import install
from segserve.loadgen import wait_until_up
from segserve.service.media.imaging import decode_image
from segserve.service.media.tiling import ScalePlan, keep_centre, tile_pixels
from segserve.service.runtime.engine import Engine
from segserve.service.settings import Settings
from segserve.training.synth import DEFAULT_MODEL_SET, JPEG_QUALITY, SynthConfig, render_mosaic

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(pid: int) -> float:
    """The most memory the process ever held resident (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def large_jpeg(megapixels: float, seed: int = 99) -> bytes:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5) // 16 * 16
    height = int(megapixels * 1e6 / width) // 16 * 16
    config = SynthConfig(count=10**6, seed=seed, **DEFAULT_MODEL_SET)
    rgb, _, _ = render_mosaic(config, (height, width))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def small_jpeg(seed: int) -> bytes:
    config = SynthConfig(
        count=10**6, seed=seed, **{**DEFAULT_MODEL_SET, "min_size": 256, "max_size": 256}
    )
    rgb, _, _ = render_mosaic(config, (256, 256), gap=0)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def post(client: httpx.Client, body: bytes) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = client.post("/segment", content=body, headers={"Content-Type": "image/jpeg"})
    return time.perf_counter() - t0, r


def beside(
    url: str, clients: int, stop: threading.Event, out: list[float]
) -> list[threading.Thread]:
    bodies = [small_jpeg(1000 + i) for i in range(8)]

    def loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            i = k
            while not stop.is_set():
                seconds, r = post(client, bodies[i % len(bodies)])
                assert r.status_code == 200, r.text
                out.append(seconds)
                i += clients

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads


def bare(model: Path, data: bytes, threads: int) -> dict:
    """session.run over the tiles the server runs, one at a time, stitched."""
    settings = Settings()
    engine = Engine.load(model, "cpu", threads, arena_shrink_pixels=settings.arena_shrink_pixels)
    plan = ScalePlan.for_card(
        engine.card, None, settings.tile_size_for("cpu"), None, engine.batch_pixel_limit or 0
    )
    rgb = decode_image(data, settings.max_image_pixels)
    grid = plan.grid(rgb.shape[:2])
    engine.segment([tile_pixels(rgb, grid.tiles[0])])  # warm
    labels = np.empty(rgb.shape[:2], np.uint8)
    t0 = time.perf_counter()
    for tile in grid.tiles:
        keep_centre(
            labels, engine.run(engine.stack([tile_pixels(rgb, tile)]), [tile.size])[0], tile
        )
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "tiles": grid.count,
        "computed_megapixels": grid.computed_pixels / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--clients", type=int, default=2, help="256x256 senders beside it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    data = large_jpeg(args.megapixels)
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    megapixels = width * height / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="segserve-large-"))
    install(tmp / "repo")
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "segserve.cli",
                "serve",
                "--repository",
                str(tmp / "repo"),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    report: dict = {
        "image": {
            "width": width,
            "height": height,
            "megapixels": megapixels,
            "jpeg_bytes": len(data),
        }
    }
    try:
        wait_until_up(url + "/readyz", proc, 120, log)
        with httpx.Client(base_url=url, timeout=600) as client:
            seconds, r = post(client, data)
            assert r.status_code == 200, r.text
            report["alone"] = {
                "seconds": seconds,
                "seconds_per_megapixel": seconds / megapixels,
                "tiles": int(r.headers["x-tiles"]),
                "server_timing": r.headers["server-timing"],
                "peak_rss_mb": peak_rss_mb(proc.pid),
            }
            print(json.dumps(report["alone"]), flush=True)
            small: list[float] = []
            stop = threading.Event()
            threads = beside(url, args.clients, stop, small)
            seconds, r = post(client, data)
            stop.set()
            for t in threads:
                t.join()
            assert r.status_code == 200, r.text
            ms = np.asarray(small) * 1000
            report["beside"] = {
                "large_seconds": seconds,
                "clients": args.clients,
                "small_requests": len(small),
                "small_p50_ms": float(np.percentile(ms, 50)),
                "small_p99_ms": float(np.percentile(ms, 99)),
                "small_max_ms": float(ms.max()),
                "peak_rss_mb": peak_rss_mb(proc.pid),
            }
            print(json.dumps(report["beside"]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    threads = Settings().intra_op_threads
    report["bare"] = bare(tmp / "repo" / "unet-shapes" / "1" / "model.onnx", data, threads)
    report["bare"]["seconds_per_megapixel"] = report["bare"]["seconds"] / megapixels
    report["service_over_bare"] = report["alone"]["seconds"] / report["bare"]["seconds"]
    report["cpu"] = cpu_name()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "large_image.json").write_text(json.dumps(report, indent=2) + "\n")


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    kinds = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16") if f" {f}" in flags]
    return f"{name} ({', '.join(kinds) or 'avx2 only'}), {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
