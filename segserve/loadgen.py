"""`segserve bench`: a closed-loop load generator for POST /segment or any Open Inference
Protocol (KServe v2 / Triton) server.

Per concurrency level, N workers send requests back to back for a fixed time; the report
gives throughput, latency percentiles (overall and per image size), errors by status, and,
read from segserve's /metrics before and after, the server's own stage breakdown and batch
sizes. With `server_pid` (a server on this machine) it also gives server CPU per request.

The client is aiohttp: on a 2-core machine the generator shares the cores with the server,
and httpx spent about as much CPU per request as the server did (measured: 5.2 ms vs
0.28 ms per request for aiohttp; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from segserve.errors import UserError
from segserve.service.telemetry.clock import Stage


class LoadError(UserError, ValueError):
    """A load test that cannot run as asked (no images, no model for v2, no matplotlib)."""


PROTOCOLS = ("segment", "v2")


@dataclass
class Payload:
    """One request body: an encoded image (for /segment) and its pixels (for v2)."""

    data: bytes
    content_type: str
    size: tuple[int, int]  # (H, W)

    @property
    def shape_label(self) -> str:
        return f"{self.size[0]}x{self.size[1]}"

    def pixels(self) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))


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
    p50_ms_by_size: dict[str, float] = field(default_factory=dict)
    server_stage_ms: dict[str, float] = field(default_factory=dict)
    server_mean_batch: float | None = None
    server_batches: int = 0
    server_cpu_ms_per_request: float | None = None


def _percentiles(values_s: list[float]) -> np.ndarray:
    return np.asarray(values_s, dtype=np.float64) * 1000 if values_s else np.asarray([np.nan])


def summarize(
    concurrency: int,
    latencies_s: list[float],
    statuses: list[int | str],
    elapsed_s: float,
    sizes: list[str] | None = None,
) -> RunStats:
    """Statistics of one run: percentiles over successful requests, counts over all."""
    ok_idx = [i for i, st in enumerate(statuses) if st == 200]
    arr = _percentiles([latencies_s[i] for i in ok_idx])
    counts = Counter(str(s) for s in statuses)
    by_size: dict[str, list[float]] = defaultdict(list)
    for i in ok_idx:
        if sizes is not None:
            by_size[sizes[i]].append(latencies_s[i])
    return RunStats(
        concurrency=concurrency,
        duration_s=elapsed_s,
        requests=len(statuses),
        ok=len(ok_idx),
        throughput_rps=len(ok_idx) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=float(np.percentile(arr, 50)),
        p95_ms=float(np.percentile(arr, 95)),
        p99_ms=float(np.percentile(arr, 99)),
        max_ms=float(np.max(arr)),
        mean_ms=float(np.mean(arr)),
        status_counts={k: v for k, v in counts.items() if k.isdigit()},
        errors={k: v for k, v in counts.items() if not k.isdigit()},
        p50_ms_by_size={
            k: float(np.percentile(_percentiles(v), 50)) for k, v in sorted(by_size.items())
        },
    )


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """All samples of segserve's /metrics as {(name, sorted labels): value}; {} elsewhere."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(url.rstrip("/") + "/metrics", timeout=10, headers=headers)
        families = list(text_string_to_metric_families(r.text)) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def server_breakdown(before: dict, after: dict) -> tuple[dict[str, float], float | None, int]:
    """Mean ms per stage and mean batch size over the run, from histogram sum/count deltas."""

    def delta(name: str, **labels) -> float:
        total = 0.0
        for (n, lab), v in after.items():
            if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
                total += v - before.get((n, lab), 0.0)
        return total

    stages = {}
    for stage in (s.value for s in Stage):
        count = delta("segserve_stage_duration_seconds_count", stage=stage)
        if count > 0:
            stages[stage] = 1000 * delta("segserve_stage_duration_seconds_sum", stage=stage) / count
    batches = delta("segserve_batch_size_count")
    mean_batch = delta("segserve_batch_size_sum") / batches if batches > 0 else None
    return stages, mean_batch, int(batches)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (all their threads):
    Triton's Python backend and LitServe's workers run in child processes."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        p = int(stat.parent.name)
        parents[p] = int(fields[1])
        times[p] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(times.get(p, 0.0) for p in tree)


def synthetic_images(
    sizes: list[tuple[int, int]], per_size: int = 4, seed: int = 0
) -> list[Payload]:
    """JPEGs of the given (H, W) sizes with shapes on them (not noise, which JPEG inflates),
    in a seeded random order: `bench` sends them round-robin, and in the order made the
    sizes would arrive in runs of `per_size`, which hands a batcher equal shapes that mixed
    traffic would not."""
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
            images.append(Payload(buf.getvalue(), "image/jpeg", (h, w)))
    return [images[i] for i in rng.permutation(len(images))]


def folder_images(folder: Path, limit: int = 64) -> list[Payload]:
    from PIL import Image

    types = {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
    }
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in types)[:limit]
    if not files:
        raise LoadError(f"no images in {folder}")
    payloads = []
    for p in files:
        with Image.open(p) as im:
            w, h = im.size
        payloads.append(Payload(p.read_bytes(), types[p.suffix.lower()], (h, w)))
    return payloads


def v2_body(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer request: UINT8 [1, H, W, 3] in, labels back as binary."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [1, *pixels.shape],
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + pixels.tobytes(), headers


@dataclass
class Target:
    """Where and how to send: /segment (encoded images) or v2 infer (pixels)."""

    url: str
    protocol: str = "segment"
    model: str | None = None
    fmt: str = "png"
    api_key: str | None = None
    multipart: bool = False  # segment: a form field `image` instead of the raw image body

    def requests(self, images: list[Payload]) -> list[tuple[str, bytes, dict, str]]:
        """(path, body, headers, size label) per image, built once before the run."""
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out = []
        for im in images:
            if self.protocol == "v2":
                if not self.model:
                    raise LoadError("--protocol v2 needs --model NAME")
                body, headers = v2_body(im.pixels())
                out.append(
                    (f"/v2/models/{self.model}/infer", body, {**headers, **auth}, im.shape_label)
                )
            else:
                query = f"?format={self.fmt}" + (f"&model={self.model}" if self.model else "")
                body, content_type = im.data, im.content_type
                if self.multipart:
                    body, content_type = multipart_body(im)
                headers = {"Content-Type": content_type, **auth}
                out.append((f"/segment{query}", body, headers, im.shape_label))
        return out


def multipart_body(im: Payload, boundary: str = "segserve-bench-boundary") -> tuple[bytes, str]:
    """The image as form field `image`, encoded once (not per request)."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
        f"Content-Type: {im.content_type}\r\n\r\n"
    ).encode()
    return (
        head + im.data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


async def run_level(
    target: Target, images: list[Payload], concurrency: int, duration_s: float, progress: bool
) -> RunStats:
    """N workers send requests back to back for `duration_s`; the run's statistics."""
    import aiohttp
    from tqdm import tqdm

    prepared = target.requests(images)
    latencies: list[float] = []
    statuses: list[int | str] = []
    sizes: list[str] = []
    counter = iter(range(10**12))
    bar = tqdm(
        total=round(duration_s),
        desc=f"concurrency {concurrency}",
        unit="s",
        disable=not progress,
        leave=False,
    )
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(target.url, connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        stop_at = start + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                path, body, headers, size = prepared[next(counter) % len(prepared)]
                t0 = time.perf_counter()
                try:
                    async with session.post(path, data=body, headers=headers) as r:
                        await r.read()
                        statuses.append(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses.append(type(exc).__name__)
                latencies.append(time.perf_counter() - t0)
                sizes.append(size)

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
    return summarize(concurrency, latencies, statuses, elapsed, sizes)


def check_reachable(url: str) -> None:
    """Any HTTP answer will do; a refused connection raises ConnectionError before a run
    would count thousands of them."""
    try:
        httpx.get(url, timeout=10)
    except httpx.TransportError as exc:
        raise ConnectionError(str(exc) or type(exc).__name__) from exc


def bench(
    target: Target,
    concurrencies: list[int],
    duration_s: float,
    images: list[Payload],
    progress: bool = True,
    server_pid: int | None = None,
) -> list[RunStats]:
    check_reachable(target.url)
    auth = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else None
    results = []
    for n in concurrencies:
        before = scrape(target.url, auth)
        cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
        stats = asyncio.run(run_level(target, images, n, duration_s, progress))
        if server_pid:
            stats.server_cpu_ms_per_request = (
                1000 * (cpu_seconds(server_pid) - cpu0) / max(stats.requests, 1)
            )
        stats.server_stage_ms, stats.server_mean_batch, stats.server_batches = server_breakdown(
            before, scrape(target.url, auth)
        )
        results.append(stats)
    return results


def format_table(results: list[RunStats]) -> str:
    head = (
        f"{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'ok':>7}"
        f"{'errors':>16}{'batch':>7}{'cpu ms':>8}  server stages (mean ms)"
    )
    lines = [head]
    for r in results:
        errors = {k: v for k, v in {**r.status_counts, **r.errors}.items() if k != "200"}
        err = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"
        batch = f"{r.server_mean_batch:.2f}" if r.server_mean_batch else "-"
        cpu = f"{r.server_cpu_ms_per_request:.2f}" if r.server_cpu_ms_per_request else "-"
        stages = " ".join(f"{k} {v:.1f}" for k, v in r.server_stage_ms.items())
        lines.append(
            f"{r.concurrency:>5}{r.throughput_rps:>9.2f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}"
            f"{r.p99_ms:>9.1f}{r.max_ms:>9.1f}{r.ok:>7}{err:>16}{batch:>7}{cpu:>8}  {stages}"
        )
        if len(r.p50_ms_by_size) > 1:
            per = ", ".join(f"{k} {v:.1f}" for k, v in r.p50_ms_by_size.items())
            lines.append(f"{'':>5}p50 by size (ms): {per}")
    return "\n".join(lines)


def plot(results: list[RunStats], path: Path, title: str = "segserve") -> Path:
    """Latency percentiles (log scale) and throughput against concurrency, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LoadError("--plot needs matplotlib: pip install 'segserve[bench]'") from exc
    conc = [r.concurrency for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax1.plot(
            conc, [getattr(r, key) for r in results], marker="o", label=key.removesuffix("_ms")
        )
    ax1.axhline(200, color="red", linestyle="--", linewidth=1, label="200 ms")
    ax1.set(
        xscale="log", yscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency"
    )
    ax1.legend()
    ax2.plot(conc, [r.throughput_rps for r in results], marker="o")
    ax2.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(
    target: Target, duration_s: float, images: list[Payload], results: list[RunStats]
) -> str:
    """The whole bench as one JSON object: what was measured and one entry per level."""
    return json.dumps(
        {
            "url": target.url,
            "protocol": target.protocol,
            "model": target.model,
            "duration_s": duration_s,
            "images": sorted({im.shape_label for im in images}),
            "runs": [asdict(r) for r in results],
        },
        indent=2,
    )


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll `url` until it answers 200 (a server process starting); a RuntimeError with the
    end of its log when the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the server was not up in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.1)
