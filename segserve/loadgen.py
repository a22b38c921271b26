"""`segserve bench`: an async HTTP load generator for POST /segment.

Per concurrency level it runs N workers for a fixed time, then reports throughput,
latency percentiles and errors by status, plus the server's own stage breakdown and batch
sizes read from /metrics before and after (the difference is this run's share).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

STAGES = ("decode", "queue", "preprocess", "inference", "encode")


@dataclass
class RunStats:
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float  # successful responses per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    status_counts: dict[str, int]
    errors: dict[str, int] = field(default_factory=dict)  # transport errors by kind
    server_stage_ms: dict[str, float] = field(default_factory=dict)
    server_mean_batch: float | None = None
    server_batches: int = 0


def summarize(
    concurrency: int, latencies_s: list[float], statuses: list[int | str], elapsed_s: float
) -> RunStats:
    """Statistics of one run: percentiles over successful requests, counts over all."""
    ok = [lat for lat, st in zip(latencies_s, statuses, strict=True) if st == 200]
    arr = np.asarray(ok, dtype=np.float64) * 1000 if ok else np.asarray([np.nan])
    counts = Counter(str(s) for s in statuses)
    return RunStats(
        concurrency=concurrency,
        duration_s=elapsed_s,
        requests=len(statuses),
        ok=len(ok),
        throughput_rps=len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=float(np.percentile(arr, 50)),
        p95_ms=float(np.percentile(arr, 95)),
        p99_ms=float(np.percentile(arr, 99)),
        max_ms=float(np.max(arr)),
        mean_ms=float(np.mean(arr)),
        status_counts={k: v for k, v in counts.items() if k.isdigit()},
        errors={k: v for k, v in counts.items() if not k.isdigit()},
    )


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """All samples of segserve's /metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def server_breakdown(before: dict, after: dict) -> tuple[dict[str, float], float | None, int]:
    """Mean ms per stage and mean batch size over the run, from histogram sum/count deltas."""

    def delta(name: str, **labels) -> float:
        total = 0.0
        for (n, lab), v in after.items():
            if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
                total += v - before.get((n, lab), 0.0)
        return total

    stages = {}
    for stage in STAGES:
        count = delta("segserve_stage_duration_seconds_count", stage=stage)
        if count > 0:
            stages[stage] = 1000 * delta("segserve_stage_duration_seconds_sum", stage=stage) / count
    batches = delta("segserve_batch_size_count")
    mean_batch = delta("segserve_batch_size_sum") / batches if batches > 0 else None
    return stages, mean_batch, int(batches)


def synthetic_images(
    sizes: list[tuple[int, int]], per_size: int = 4, seed: int = 0
) -> list[tuple[bytes, str]]:
    """JPEGs of the given sizes with shapes on them (not noise, which JPEG inflates)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        for _ in range(per_size):
            image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                r = int(rng.integers(max(2, min(h, w) // 20), max(3, min(h, w) // 3)))
                draw.ellipse(
                    (x0 - r, y0 - r, x0 + r, y0 + r),
                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                )
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            images.append((buf.getvalue(), "image/jpeg"))
    return images


def folder_images(folder: Path, limit: int = 64) -> list[tuple[bytes, str]]:
    types = {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
    }
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in types)[:limit]
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [(p.read_bytes(), types[p.suffix.lower()]) for p in files]


async def run_level(
    url: str,
    images: list[tuple[bytes, str]],
    concurrency: int,
    duration_s: float,
    params: dict,
    headers: dict,
    progress: bool = True,
) -> RunStats:
    """N workers send requests back to back for `duration_s`; returns the run's statistics."""
    from tqdm import tqdm

    latencies: list[float] = []
    statuses: list[int | str] = []
    cycle = itertools.cycle(range(len(images)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(
        total=round(duration_s),
        desc=f"concurrency {concurrency}",
        unit="s",
        disable=not progress,
        leave=False,
    )
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                body, content_type = images[next(cycle)]
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/segment",
                        params=params,
                        content=body,
                        headers={"Content-Type": content_type, **headers},
                    )
                    await r.aread()
                    statuses.append(r.status_code)
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)
                latencies.append(time.perf_counter() - t0)

        async def ticker() -> None:
            while time.perf_counter() < stop_at:
                await asyncio.sleep(1)
                bar.n = min(round(time.perf_counter() - start), bar.total)
                bar.refresh()

        tick = asyncio.ensure_future(ticker())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        tick.cancel()
        elapsed = time.perf_counter() - start
    bar.close()
    return summarize(concurrency, latencies, statuses, elapsed)


def bench(
    url: str,
    concurrencies: list[int],
    duration_s: float,
    images: list[tuple[bytes, str]],
    fmt: str = "png",
    api_key: str | None = None,
    progress: bool = True,
) -> list[RunStats]:
    params = {"format": fmt}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []
    for n in concurrencies:
        before = scrape(url)
        stats = asyncio.run(run_level(url, images, n, duration_s, params, headers, progress))
        stats.server_stage_ms, stats.server_mean_batch, stats.server_batches = server_breakdown(
            before, scrape(url)
        )
        results.append(stats)
    return results


def format_table(results: list[RunStats]) -> str:
    head = f"{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ok':>7}{'errors':>16}{'batch':>7}  server stages (mean ms)"
    lines = [head]
    for r in results:
        errors = {k: v for k, v in {**r.status_counts, **r.errors}.items() if k != "200"}
        err = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"
        batch = f"{r.server_mean_batch:.2f}" if r.server_mean_batch else "-"
        stages = " ".join(f"{k} {v:.1f}" for k, v in r.server_stage_ms.items())
        lines.append(
            f"{r.concurrency:>5}{r.throughput_rps:>9.2f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}{r.ok:>7}{err:>16}{batch:>7}  {stages}"
        )
    return "\n".join(lines)


def plot(results: list[RunStats], path: Path, title: str = "segserve") -> Path:
    """Latency percentiles and throughput against concurrency, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'segserve[bench]'") from exc
    conc = [r.concurrency for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax1.plot(
            conc, [getattr(r, key) for r in results], marker="o", label=key.removesuffix("_ms")
        )
    ax1.axhline(200, color="red", linestyle="--", linewidth=1, label="200 ms")
    ax1.set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency")
    ax1.legend()
    ax2.plot(conc, [r.throughput_rps for r in results], marker="o")
    ax2.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(results: list[RunStats]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
