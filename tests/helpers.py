"""Test helpers: tiny checkpoints, the app in-process, and a real `segserve serve` process."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from segserve.loadgen import wait_until_up

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path, architecture="unet", num_classes=4, **opts):
    """An untrained network saved as training saves one."""
    import torch

    from segserve.models import build_model
    from segserve.training.checkpoint import checkpoint_fields, save_checkpoint

    torch.manual_seed(0)
    model = build_model(architecture, num_classes, **opts).eval()
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    palette = [[i * 20, 255 - i * 20, i * 5] for i in range(num_classes)]
    scores = {"pixel_accuracy": 0.9, "mean_accuracy": 0.8, "mean_iu": 0.7, "fw_iu": 0.85}
    save_checkpoint(
        path, **checkpoint_fields(model, architecture, opts, names, palette, scores, "test")
    )
    return path


def conversion_path(cache: Path, net) -> Path:
    """Where in CACHE a network's torch -> ONNX conversion goes: named by class and weights."""
    import hashlib

    digest = hashlib.sha256(type(net).__name__.encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return cache / f"{digest.hexdigest()}.onnx"


def convert_into(path: Path, net, convert) -> None:
    """`convert(net)` (export's `convert_network`) saved at PATH whole or not at all: another
    process may read it at any moment."""
    partial = path.with_suffix(".partial")
    partial.write_bytes(convert(net).SerializeToString())
    partial.replace(path)


def convert_the_tiny_unet(cache: str | Path) -> None:
    """Converts the network every tiny test checkpoint holds (`make_checkpoint(width=8,
    batch_norm=True)`, folded as export folds it) into CACHE. Run as a process of its own at
    the start of a whole-suite run (tests/conftest.py)."""
    import tempfile

    from segserve.export.onnx_export import convert_network, fold_batch_norm
    from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny.pt", width=8, batch_norm=True)
        net = fold_batch_norm(model_from_checkpoint(load_checkpoint(ckpt)).eval())
    convert_into(conversion_path(Path(cache), net), net, convert_network)


def wait_for(
    condition,
    timeout: float = 30.0,
    what: str = "the condition",
    ignoring: tuple[type[BaseException], ...] = (),
    detail=None,
    interval: float = 0.01,
) -> None:
    """Poll `condition()` until it is true; fail the test after `timeout` seconds. Exceptions
    of the `ignoring` kinds count as "not yet" (a server still starting); `detail()`, when
    given, is added to the failure (a log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except ignoring:
            pass
        if time.monotonic() >= deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s{more}")
        time.sleep(interval)


def require_tool(name: str, install: str) -> str:
    """The path of a command a test needs. Missing, the test is skipped on a developer's
    machine, but fails under CI (CI=true), where the Makefile installs it: a failed install
    must not shrink `make test` silently."""
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is missing: {install}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: the Makefile installs it, so a missing tool fails)")
        pytest.skip(message)
    return path


async def await_for(condition, timeout: float = 30.0, what: str = "the condition") -> None:
    """`wait_for` on an event loop: polls without blocking it."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def run_server(
    repository: Path, tmp_path: Path, wait_ready: bool = True, port: int | None = None, **settings
):
    """`segserve serve` as its own process on a loopback port (a free one unless given),
    settings as env vars."""
    port = port or free_port()
    # float32 unless a test asks: timing an int8 variant at every start is seconds the
    # suite spends again and again (test_variants and the browser test ask for auto).
    env = {
        **os.environ,
        "SEGSERVE_WARMUP_SHAPES": "64x64",
        "SEGSERVE_INTRA_OP_THREADS": "2",
        "SEGSERVE_VARIANT": "float32",
    }
    env.update({f"SEGSERVE_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    for name in [k for k, v in settings.items() if v is None]:  # None: the server's default
        env.pop(f"SEGSERVE_{name.upper()}", None)
    log = tmp_path / f"server-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "segserve.cli",
                "serve",
                "--repository",
                str(repository),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_up(server.url + ("/readyz" if wait_ready else "/healthz"), proc, 60, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_prometheus(binary: str, config: Path, data: Path, port: int, log: Path):
    """A real Prometheus on loopback with this config and TSDB folder, logging to `log`."""
    return subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


class OtlpReceiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver (no collector runs here): decodes each export with
    opentelemetry-proto and keeps every span it got in `spans`."""

    spans: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        import gzip

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                OtlpReceiver.spans.extend(scope.spans)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@contextmanager
def otlp_receiver():
    """The receiver on a loopback port; yields its endpoint URL."""
    server = HTTPServer(("127.0.0.1", 0), OtlpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def spans_of(trace: str) -> list:
    """The spans the receiver got of one trace (hex id)."""
    return [s for s in OtlpReceiver.spans if s.trace_id.hex() == trace]


class InProcess:
    """The real app (lifespan, batchers, onnxruntime) on its own event loop in a thread,
    reached through httpx's ASGITransport: no socket, no subprocess. Calls block like a
    plain client; `many` sends requests concurrently."""

    def __init__(self, repository: Path, **settings) -> None:
        from segserve.service.app import create_app
        from segserve.service.settings import Settings

        values = {"warmup_shapes": "64x64", "intra_op_threads": 2, "variant": "float32", **settings}
        self.app = create_app(Settings(repository=repository, **values))
        self.service = self.app.state.service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.run(self.lifespan.__aenter__())
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://segserve", timeout=60)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, **kw) -> httpx.Response:
        return self.run(self.client.request(method, url, **kw))

    def get(self, url: str, **kw) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.request("POST", url, **kw)

    def many(self, calls: list[tuple[str, str, dict]]) -> list[httpx.Response]:
        """(method, url, kwargs) requests sent together; answers in the same order."""

        async def all_of():
            return await asyncio.gather(*(self.client.request(m, u, **kw) for m, u, kw in calls))

        return self.run(all_of())

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def in_process(repository: Path, **settings):
    app = InProcess(repository, **settings)
    try:
        yield app
    finally:
        app.close()


def image_bytes(h: int, w: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def v2_json(base64_images: list[str]) -> dict:
    """A v2 infer request in JSON with a BYTES input of encoded images."""
    return {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(base64_images)],
                "data": base64_images,
            }
        ]
    }


def metric_samples(text: str) -> dict:
    """Prometheus exposition text -> {sample name: [samples]}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def write_check_set(model_dir: Path) -> None:
    """A check set for the untrained tiny model: random images labelled with v1's own
    answers (so v1 scores 1.0 and any version that answers otherwise scores less)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    check = model_dir / "checkset"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (check / sub).mkdir(parents=True)
    ids = []
    for i in range(8):
        path = check / "JPEGImages" / f"c{i}.jpg"
        Image.open(io.BytesIO(image_bytes(64, 96, "JPEG", seed=i))).save(path)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        labels = session.run(None, {"image": rgb[None]})[0][0]
        Image.fromarray(labels.astype(np.uint8)).save(check / "SegmentationClass" / f"c{i}.png")
        ids.append(f"c{i}")
    (check / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def without_its_commonest_class(model_dir: Path, target: Path) -> None:
    """A copy of v1 whose classifier can no longer say the class it says most on the check
    set (its bias at -1000): it loads, warms and answers like any other version."""
    import onnx
    from onnx import numpy_helper

    labels = [
        np.asarray(Image.open(p))
        for p in (model_dir / "checkset" / "SegmentationClass").glob("*.png")
    ]
    commonest = int(np.bincount(np.concatenate([x.ravel() for x in labels])).argmax())
    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    for init in model.graph.initializer:
        if init.name.endswith("classifier.bias"):
            bias = numpy_helper.to_array(init).copy()
            bias[commonest] = -1000.0
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    onnx.save(model, str(target / "model.onnx"))
