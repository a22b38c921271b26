"""segserve side by side with the servers users would pick instead, on the same model, the
same images and the same load generator (`segserve bench`), one server at a time, order
alternated, repeated to show the noise.

    python -m bench.peers --repository model_repository --model unet-shapes   (make bench-peers)

- Triton 2.51 (from the `nvidia-pytriton` wheel: its tritonserver binary and Python
  backend), model.py = segserve's Engine, dynamic batching (max batch 8, 5 ms delay), driven
  over v2 with binary UINT8 [1,H,W,3] tensors; segserve on the same v2 route.
- LitServe, LitAPI around the same Engine with its own batching, driven with multipart JPEG
  uploads to /segment; segserve on /segment with the same uploads.
- The limit: bare `session.run` over the same image mix (batch 1 and the best batch).

Traffic: 512x512 only, and a mix of five shapes (480x640, 500x375, 512x512, 384x512,
600x400). Per server and level: throughput, p50/p95/p99, p50 per shape, mean batch
(segserve /metrics, Triton /v2/models/NAME/stats), server CPU per request (/proc, the
server's process tree). Set-up (a venv per peer, from the package index) is cached in
.bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from segserve import loadgen
from segserve.contracts.repository import walk
from segserve.service.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench"
SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # the interpreter Triton's 3.11 stub embeds
TRITON_WHEEL = "nvidia-pytriton==0.7.0"
MIXED = [(480, 640), (500, 375), (512, 512), (384, 512), (600, 400)]
SQUARE = [(512, 512)]
WARMUP_CONCURRENCY, WARMUP_S = 16, 8.0


def run(cmd: list, **kw) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def make_venv(path: Path, packages: list[str]) -> Path:
    """A venv from the system Python 3.11 with `packages` (cached) and this checkout's
    segserve (no deps, installed again every time: the peers run the Engine as it is now)."""
    python = path / "bin" / "python"
    stamp = path / ".ready"
    if not stamp.exists():
        if not SYSTEM_PYTHON.exists():
            raise SystemExit(f"{SYSTEM_PYTHON} is needed (Triton's Python backend embeds it)")
        shutil.rmtree(path, ignore_errors=True)
        run([SYSTEM_PYTHON, "-m", "venv", path])
        run([python, "-m", "pip", "install", "-q", *packages])
        stamp.write_text("ok\n")
    # A real install, not editable: the Python backend's interpreter reads no .pth files.
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", ROOT])
    return python


@dataclass
class Triton:
    venv: Path

    @property
    def site(self) -> Path:
        return next((self.venv / "lib").glob("python3*/site-packages"))

    @property
    def home(self) -> Path:
        return self.site / "pytriton" / "tritonserver"


def setup_triton() -> Triton:
    # numpy 1.26: with numpy 2 the 0.7.0 stub silently returned 0-byte outputs.
    packages = [TRITON_WHEEL, "numpy==1.26.*", f"onnxruntime=={onnxruntime_version()}"]
    triton = Triton(make_venv(CACHE / "triton-venv", packages).parent.parent)
    stub = triton.home / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
    shutil.copy(stub, triton.home / "backends" / "python" / stub.name)
    return triton


def setup_litserve() -> Path:
    packages = ["litserve", "python-multipart", "pillow", f"onnxruntime=={onnxruntime_version()}"]
    return make_venv(CACHE / "litserve-venv", packages)


def write_triton_repository(onnx: Path, name: str, out: Path, threads: int) -> Path:
    folder = out / name / "1"
    folder.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("triton_model.py"), folder / "model.py")
    (out / name / "config.pbtxt").write_text(
        f'backend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] } ]\n'
        'output [ { name: "labels" data_type: TYPE_UINT8 dims: [ -1, -1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 5000 }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        f'parameters: {{ key: "onnx" value: {{ string_value: "{onnx}" }} }}\n'
        f'parameters: {{ key: "threads" value: {{ string_value: "{threads}" }} }}\n'
    )
    return out


@dataclass
class Running:
    url: str
    pid: int
    kind: str  # segserve | triton | litserve
    model: str

    def batch_counters(self) -> tuple[float, float] | None:
        """(images, runs) so far, where the server says; None where it does not."""
        if self.kind == "segserve":
            s = loadgen.scrape(self.url)
            images = sum(v for (n, _), v in s.items() if n == "segserve_batch_size_sum")
            runs = sum(v for (n, _), v in s.items() if n == "segserve_batch_size_count")
            return images, runs
        if self.kind == "triton":
            stats = httpx.get(f"{self.url}/v2/models/{self.model}/stats", timeout=10).json()
            m = stats["model_stats"][0]
            return float(m["inference_count"]), float(m["execution_count"])
        return None


@contextlib.contextmanager
def serving(
    kind: str, port: int, args, work: Path, triton: Triton | None, lit_python: Path | None
) -> Iterator[Running]:
    env = {**os.environ}
    onnx = args.entry.model_path
    if kind == "segserve":
        env.update(
            SEGSERVE_REPOSITORY=str(args.entry.folder.parent.parent),
            SEGSERVE_DEFAULT_MODEL=args.model,
            SEGSERVE_INTRA_OP_THREADS=str(args.threads),
            SEGSERVE_WARMUP_SHAPES="512x512,480x640",
        )
        cmd = [sys.executable, "-m", "segserve.cli", "serve", "--port", str(port)]
        ready, name = "/readyz", args.model
    elif kind == "triton":
        repo = write_triton_repository(onnx, "seg", Path(tempfile.mkdtemp(dir=work)), args.threads)
        env.update(
            LD_LIBRARY_PATH=str(triton.site / "nvidia_pytriton.libs"),
            PATH=f"{triton.venv / 'bin'}:{env['PATH']}",
            PYTHONPATH=str(triton.site),
        )
        cmd = [
            triton.home / "bin" / "tritonserver",
            f"--model-repository={repo}",
            f"--backend-directory={triton.home / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={port}",
            f"--grpc-port={port + 1}",
            f"--metrics-port={port + 2}",
            "--backend-config=python,shm-default-byte-size=33554432",
            "--strict-readiness=true",
        ]
        ready, name = "/v2/health/ready", "seg"
    else:
        env.update(
            PEER_ONNX=str(onnx),
            PEER_PORT=str(port),
            PEER_THREADS=str(args.threads),
            PEER_BATCH="8",
            PEER_DELAY_S="0.005",
            PYTHONPATH="",
        )
        cmd = [lit_python, Path(__file__).with_name("litserve_peer.py")]
        ready, name = "/health", args.model
    log = work / f"{kind}-{port}.log"
    # Peers start outside the checkout: there, `segserve` would be the source folder, not the
    # installed package (whose parts the package-dir mapping puts in place).
    cwd = ROOT if kind == "segserve" else work
    # A session of its own, so that stopping it stops its children too: LitServe's worker
    # processes outlived their server and polled their queues (~4 % CPU each) for the rest
    # of the run, under every later measurement.
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} not ready in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Running(url, proc.pid, kind, name)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _images_per_s(engine: Engine, images: list[loadgen.Payload], n: int, seconds: float) -> float:
    """Images/s of bare session.run, batches of `n` copies of one image, mean over the shapes."""
    by_shape: dict = {}
    for im in images:
        by_shape.setdefault(im.size, im.pixels())
    per_image = []
    for p in by_shape.values():
        batch, sizes = engine.stack([p] * n), [p.shape[:2]] * n
        engine.run(batch, sizes)
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds / len(by_shape):
            engine.run(batch, sizes)
            runs += 1
        per_image.append((time.perf_counter() - start) / runs / n)
    return 1 / float(np.mean(per_image))


def bare_limit(engine: Engine, images: list[loadgen.Payload], seconds: float) -> dict:
    """Images/s of bare session.run over the image mix: batch 1, and the best batch of one
    shape (1, 2, 4, 8), mean over the mix's shapes."""
    result = {n: _images_per_s(engine, images, n, seconds) for n in (1, 2, 4, 8)}
    return {
        "batch1_img_s": result[1],
        "best_img_s": max(result.values()),
        "best_batch": max(result, key=result.get),
        "by_batch": result,
    }


def limit_now(engine: Engine, images: list[loadgen.Payload], best_batch: int) -> float:
    """The limit again, in a few seconds (batch 1 and the best batch): this machine's speed
    drifts by more than 5 % within minutes, so every level is set against the limit
    measured just before and just after it."""
    return max(_images_per_s(engine, images, n, 4.0) for n in {1, best_batch})


def labels_agree(a: Running, b: Running, images: list[loadgen.Payload], protocol: str) -> bool:
    """The two servers give the same labels for one image of every shape."""
    from PIL import Image

    seen = {}
    for im in images:
        seen.setdefault(im.size, im)
    for im in seen.values():
        outs = []
        for server in (a, b):
            if protocol == "v2":
                body, headers = loadgen.v2_body(im.pixels())
                r = httpx.post(
                    f"{server.url}/v2/models/{server.model}/infer",
                    content=body,
                    headers=headers,
                    timeout=60,
                )
                size = int(r.headers["inference-header-content-length"])
                outs.append(np.frombuffer(r.content[size:], np.uint8).reshape(im.size))
            else:
                r = httpx.post(
                    f"{server.url}/segment",
                    files={"image": ("i.jpg", im.data, im.content_type)},
                    timeout=60,
                )
                outs.append(np.asarray(Image.open(io.BytesIO(r.content))))
        if not np.array_equal(*outs):
            return False
    return True


def measure(server: Running, protocol: str, images, levels, duration, limit) -> list[dict]:
    """Every level, with `limit()` (bare session.run, the server idle) measured before it
    and after it."""
    rows = []
    target = loadgen.Target(server.url, protocol, server.model, multipart=protocol == "segment")
    # Unmeasured traffic first: every server grows its arenas and meets its batch sizes
    # before the clock runs (segserve's start-up warm-up covers shapes, not batches).
    loadgen.bench(target, [WARMUP_CONCURRENCY], WARMUP_S, images, progress=False)
    limit_before = limit()
    for n in levels:
        before = server.batch_counters()
        (stats,) = loadgen.bench(
            target, [n], duration, images, progress=False, server_pid=server.pid
        )
        after = server.batch_counters()
        row = asdict(stats)
        row["mean_batch"] = (
            (after[0] - before[0]) / max(after[1] - before[1], 1) if before else None
        )
        limit_after = limit()
        row["limit_img_s"] = (limit_before + limit_after) / 2
        limit_before = limit_after
        rows.append(row)
        print(
            f"  {server.kind:<9} c={n:<3} {stats.throughput_rps:6.2f}/s p50 {stats.p50_ms:8.1f} "
            f"p99 {stats.p99_ms:8.1f} ms limit {row['limit_img_s']:5.2f} batch {row['mean_batch'] or 0:4.2f} "
            f"cpu {stats.server_cpu_ms_per_request:6.1f} ms errors {stats.errors or '-'} "
            f"{ {k: v for k, v in stats.status_counts.items() if k != '200'} or '' }",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="unet-shapes")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per server and traffic, order alternated"
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="onnxruntime intra-op threads, every server",
    )
    p.add_argument(
        "--peers", nargs="+", default=["triton", "litserve"], choices=["triton", "litserve"]
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args()
    args.repository = args.repository.resolve()  # the peers run in other working directories
    entries = [e for e in walk(args.repository) if e.name == args.model]
    if not entries:
        raise SystemExit(f"no model {args.model!r} in {args.repository} (make bootstrap)")
    args.entry = entries[-1]
    triton = setup_triton() if "triton" in args.peers else None
    lit_python = setup_litserve() if "litserve" in args.peers else None
    # The limit is onnxruntime as it comes: its CPU arena on and never shrunk, idle threads
    # spinning (the servers do not spin: their other threads need the cores).
    engine = Engine.load(
        args.entry.model_path, "cpu", args.threads, spinning=True, arena_shrink_pixels=None
    )
    report: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "model": f"{args.model} v{args.entry.version}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration_s": args.duration,
        "repeats": args.repeats,
        "threads": args.threads,
        "traffic": {},
    }
    port = 21000 + os.getpid() % 500 * 4
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        for traffic, sizes in (("512x512", SQUARE), ("mixed", MIXED)):
            images = loadgen.synthetic_images(sizes, per_size=4)
            limit = bare_limit(engine, images, 30.0)
            print(
                f"{traffic}: bare session.run {limit['batch1_img_s']:.2f} img/s at batch 1, "
                f"{limit['best_img_s']:.2f} at batch {limit['best_batch']}",
                flush=True,
            )
            section = report["traffic"][traffic] = {"limit": limit, "runs": []}
            pairs = [("v2", "triton")] if triton else []
            pairs += [("segment", "litserve")] if lit_python else []
            for protocol, peer in pairs:
                for repeat in range(args.repeats):
                    order = ["segserve", peer] if repeat % 2 == 0 else [peer, "segserve"]
                    for kind in order:
                        port += 4
                        with serving(kind, port, args, work, triton, lit_python) as server:
                            rows = measure(
                                server,
                                protocol,
                                images,
                                args.concurrency,
                                args.duration,
                                functools.partial(limit_now, engine, images, limit["best_batch"]),
                            )
                        section["runs"].append(
                            {"server": kind, "protocol": protocol, "repeat": repeat, "levels": rows}
                        )
                if repeat == args.repeats - 1:
                    with (
                        serving("segserve", port + 8, args, work, triton, lit_python) as a,
                        serving(peer, port + 12, args, work, triton, lit_python) as b,
                    ):
                        section[f"labels_equal_{peer}"] = labels_agree(a, b, images, protocol)
                    print(
                        f"  labels equal, segserve vs {peer}: {section[f'labels_equal_{peer}']}",
                        flush=True,
                    )
                    port += 16
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2))
    from bench.peers.report import markdown

    text = markdown(report)
    (args.out / "peers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
