"""Memory under hostile traffic: the server's RSS, sampled while it serves a mix of requests
of random sizes from 1x1 to 40 MP-declared images (tiny files declaring big sizes), broken
and hostile files, and 64-image v2 requests.

    python -m bench.soak --requests 1000 --out docs/bench        (a server it starts itself)

Writes soak.json (every RSS sample, statuses, the peak) and soak_rss.png (the RSS curve).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from corpus import cases, gif_declaring, png_declaring  # noqa: E402

from segserve.loadgen import synthetic_images  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def black_png(width: int, height: int) -> bytes:
    """A real, fully decodable PNG of `width` x `height`: kilobytes on the wire."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def workload(seed: int) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) choices for the mix."""
    rng = random.Random(seed)
    items: list[tuple[str, bytes, str]] = []
    for im in synthetic_images(
        [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(12)], 1, seed
    ):
        items.append(("photo", im.data, "image/jpeg"))
    for side in (1, 7, 600, 3000, 5000, 6000, 6324):  # 6324^2 = 40.0 MP, the limit
        items.append(("declared", black_png(side, side), "image/png"))
    items.append(("declared", png_declaring(60_000, 60_000), "image/png"))
    items.append(("declared", gif_declaring(65_535, 65_535), "image/gif"))
    for name, (data, _) in cases().items():
        items.append((f"corpus:{name}", data, "application/octet-stream"))
    return items


def v2_many(count: int = 64) -> bytes:
    blobs = [base64.b64encode(black_png(1000, 1000)).decode()] * count
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count], "data": blobs}]}
    ).encode()


async def drive(url: str, total: int, concurrency: int, seed: int) -> Counter:
    import aiohttp

    items = workload(seed)
    many = v2_many()
    rng = random.Random(seed)
    statuses: Counter = Counter()
    counter = iter(range(total))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:
        async with session.get("/models") as r:
            v2_path = f"/v2/models/{(await r.json())['default']}/infer"

        async def worker() -> None:
            for i in counter:
                if i % 100 == 50:
                    path, body, ctype = v2_path, many, "application/json"
                else:
                    _, body, ctype = rng.choice(items)
                    path = "/segment"
                try:
                    async with session.post(path, data=body, headers={"Content-Type": ctype}) as r:
                        await r.read()
                        statuses[r.status] += 1
                except aiohttp.ClientError as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def soak(url: str, pid: int, total: int, concurrency: int = 8, seed: int = 0) -> dict:
    """Drive the mix at `url` while sampling `pid`'s RSS every 0.2 s."""
    import httpx

    samples: list[tuple[float, float]] = []
    health_ms: list[float] = []
    done = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set():
                samples.append((time.monotonic() - start, rss_mb(pid)))
                t0 = time.perf_counter()
                client.get("/healthz")
                health_ms.append(1000 * (time.perf_counter() - t0))
                done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    baseline = rss_mb(pid)
    sampler.start()
    statuses = asyncio.run(drive(url, total, concurrency, seed))
    done.set()
    sampler.join()
    return {
        "requests": total,
        "concurrency": concurrency,
        "seconds": time.monotonic() - start,
        "rss_before_mb": baseline,
        "rss_peak_mb": max(s[1] for s in samples),
        "rss_after_mb": rss_mb(pid),
        "statuses": {str(k): v for k, v in statuses.items()},
        "healthz_ms": {
            "p50": float(np.percentile(health_ms, 50)),
            "p99": float(np.percentile(health_ms, 99)),
            "max": max(health_ms),
            "samples": len(health_ms),
        },
        "samples": samples,
    }


def plot(result: dict, path: Path, budget_mb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss = zip(*result["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, rss, linewidth=1)
    ax.axhline(budget_mb, color="red", linestyle="--", linewidth=1, label=f"{budget_mb:.0f} MB")
    ax.set(
        xlabel="seconds",
        ylabel="server RSS (MB)",
        title=f"{result['requests']} hostile and mixed requests, concurrency {result['concurrency']}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    from bench.compare import SEGSERVE, running

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--env", nargs="*", default=[], help="extra SEGSERVE_X=Y settings")
    args = p.parse_args()
    port = 22000 + os.getpid() % 1000
    env = {"SEGSERVE_REPOSITORY": str(args.repository), **dict(e.split("=", 1) for e in args.env)}
    log = Path(tempfile.mkdtemp()) / "soak-server.log"
    with running(SEGSERVE, port, env, log) as proc:
        result = soak(f"http://127.0.0.1:{port}", proc.pid, args.requests, args.concurrency)
    result["settings"] = env
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result))
    plot(result, args.out / "soak_rss.png", 1024)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
