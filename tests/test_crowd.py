"""Memory bounded under a crowd of uploads (make test-slow): a server with default settings
and the shipped model against 300 concurrent uploads of 20 MB JPEGs (1 MB every 0.2 s),
with small images sent beside them, then 100 concurrent gRPC messages of 20 MB. The peak
RSS stays under 1.5 GiB; every answer is 200, 503 or 504 (the 503s and 504s with
Retry-After; over gRPC OK, UNAVAILABLE with retry-after or DEADLINE_EXCEEDED, and a small
call served after them); the uploads refused for want of body budget are answered before their bodies
are sent; the small images are all served, p99 within 2 s. The figures go to
.bench/crowd-report.json (docs/benchmarks.md, "Memory under a crowd of uploads")."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import resource
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from helpers import ROOT, free_port, run_server
from segserve.default_model import install
from uploads import crowd, infer_request, upload

pytestmark = pytest.mark.slow

UPLOADS, MESSAGES = 300, 100
MIB = 1 << 20
REPORT = ROOT / ".bench" / "crowd-report.json"


def big_jpeg(target: int = 20 * 1000 * 1000) -> bytes:
    """A valid JPEG of just under `target` bytes (noise at quality 95, about 7 MP)."""
    side, data = 2400, b""
    while True:
        rgb = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=95)
        if buf.tell() > target:
            return data
        data, side = buf.getvalue(), side + 50


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class PeakRss:
    """The highest RSS of a process, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.status, self.peak, self._stop = Path(f"/proc/{pid}/status"), 0, threading.Event()

    def rss(self) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self.rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    repo = tmp_path_factory.mktemp("crowd") / "repo"
    install(repo)
    grpc_port = free_port()
    # Default settings, warm-up and tile included (the load times a full CPU batch, and the
    # arena keeps that batch's activations from then on), but float32: timing the variants
    # at load would only add its seconds here.
    logs = tmp_path_factory.mktemp("crowd-logs")
    defaults = {"warmup_shapes": None, "tile_size": None}
    with run_server(repo, logs, grpc_port=grpc_port, **defaults) as s:
        s.port, s.grpc_port = int(s.url.rsplit(":", 1)[1]), grpc_port
        yield s


def report(**entries) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    REPORT.write_text(json.dumps({**data, **entries}, indent=2))


def test_a_crowd_of_20_mb_uploads_is_bounded_and_small_images_are_served_beside_it(
    server, tmp_path
):
    body, small = big_jpeg(), small_png()
    assert 19_000_000 < len(body) <= 20_000_000  # "20 MB", under the 20 MiB body limit

    body_file = tmp_path / "big.jpg"
    body_file.write_bytes(body)

    async def beside_the_crowd(uploads):
        beside = []
        while not uploads.ready():
            beside.append(await upload("127.0.0.1", server.port, "/segment", small, "image/png"))
            await asyncio.sleep(0.25)
        return beside

    with PeakRss(server.proc.pid) as rss, multiprocessing.get_context("spawn").Pool(1) as pool:
        t0 = time.perf_counter()
        uploads = pool.apply_async(
            crowd, ("127.0.0.1", server.port, "/segment", str(body_file), UPLOADS),
            {"piece": MIB, "every_s": 0.2},
        )  # fmt: skip
        beside = asyncio.run(beside_the_crowd(uploads))
        answers = uploads.get(600)
        seconds = time.perf_counter() - t0
    statuses = Counter(a.status for a in answers)
    early = [a for a in answers if a.status == 503 and a.answered_early]
    latencies = sorted(b.seconds for b in beside)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    report(http={
        "uploads": UPLOADS, "body_bytes": len(body), "seconds": round(seconds, 1),
        "statuses": dict(statuses), "answered_before_the_body": len(early),
        "rss_start_mib": round(rss.start / MIB), "rss_peak_mib": round(rss.peak / MIB),
        "small": {"sent": len(beside), "ok": sum(b.status == 200 for b in beside),
                  "p50_s": round(latencies[len(latencies) // 2], 3), "p99_s": round(p99, 3)},
    })  # fmt: skip
    assert set(statuses) <= {200, 503, 504}, [(a.status, a.error) for a in answers][:5]
    assert all("retry-after" in a.headers for a in answers if a.status in (503, 504))
    refused_unread = [
        a for a in answers if a.status == 503 and b"request body do not fit" in a.body
    ]
    assert refused_unread and all(a.answered_early for a in refused_unread)
    assert rss.peak <= 1.5 * 1024 * MIB, rss.peak / MIB
    assert len(beside) >= 10 and all(b.status == 200 for b in beside)
    assert p99 <= 2.0, latencies[-5:]


def test_a_crowd_of_20_mb_grpc_messages_is_bounded_alike(server):
    side = int((19.5 * MIB / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    request = infer_request("unet-shapes", pixels)

    async def crowd():
        options = [
            ("grpc.max_send_message_length", 21 * MIB),
            ("grpc.max_receive_message_length", 64 * MIB),  # the labels of a 6.8 MP image
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def one():
                try:
                    await stub.ModelInfer(request, timeout=120)
                    return "OK", ()
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, dict(exc.trailing_metadata() or ())

            return await asyncio.gather(*(one() for _ in range(MESSAGES)))

    with PeakRss(server.proc.pid) as rss:
        answers = asyncio.run(crowd())
    codes = Counter(code for code, _ in answers)
    report(grpc={
        "messages": MESSAGES, "message_bytes": request.ByteSize(), "codes": dict(codes),
        "rss_start_mib": round(rss.start / MIB), "rss_peak_mib": round(rss.peak / MIB),
    })  # fmt: skip
    assert set(codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    assert all("retry-after" in trailers for code, trailers in answers if code == "UNAVAILABLE")
    assert codes["UNAVAILABLE"] < MESSAGES  # some were taken in, not all refused
    assert rss.peak <= 1.5 * 1024 * MIB, rss.peak / MIB
    # Past the crowd the server serves on: a small call is answered.
    small = infer_request("unet-shapes", np.zeros((1, 64, 64, 3), np.uint8))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(small, timeout=30)
    assert list(reply.outputs[0].shape) == [1, 64, 64]
