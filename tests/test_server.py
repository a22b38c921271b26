"""`segserve serve` as users run it: a real uvicorn process on loopback, for what only a
real socket shows (a real protocol client, signals, the process's own imports)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from helpers import image_bytes, run_server


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory):
    with run_server(tiny_repository, tmp_path_factory.mktemp("logs")) as s:
        yield s


def test_tritonclient_round_trip(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["name"] == "labels"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    payloads = [image_bytes(48, 64, seed=s) for s in (1, 2)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
    with server.client() as c:
        singles = [
            np.asarray(Image.open(io.BytesIO(
                c.post("/segment", content=p, headers={"Content-Type": "image/png"}).content
            )))
            for p in payloads
        ]  # fmt: skip
    for binary in (True, False):
        inp = triton.InferInput("image", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(
            "tiny", [inp], outputs=[triton.InferRequestedOutput("labels", binary_data=binary)]
        )
        labels = result.as_numpy("labels")
        assert labels.shape == (2, 48, 64)
        for single, lab in zip(singles, labels, strict=True):
            assert np.array_equal(lab, single)
    encoded = triton.InferInput("image", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([payloads[0]], dtype=object))
    assert np.array_equal(client.infer("tiny", [encoded]).as_numpy("labels")[0], singles[0])
    with pytest.raises(triton.InferenceServerException):
        client.infer("nope", [inp])


def inflight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "segserve_inflight_requests":
            return family.samples[0].value
    return 0.0


def test_sigterm_drains_queued_requests_then_exits(tiny_repository, tmp_path):
    payloads = [image_bytes(768, 768, seed=i) for i in range(8)]
    results: list = [None] * len(payloads)
    with run_server(tiny_repository, tmp_path, max_batch_size=1) as server:

        def send(i):
            try:
                results[i] = httpx.post(
                    server.url + "/segment",
                    content=payloads[i],
                    headers={"Content-Type": "image/png"},
                    timeout=60,
                ).status_code
            except httpx.HTTPError as exc:
                results[i] = exc

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        # Poll until all eight have arrived (the /metrics request itself is one in flight).
        while time.monotonic() < deadline:
            in_flight = inflight(server.url) - 1
            if in_flight + sum(r is not None for r in results) >= len(payloads):
                break
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        assert in_flight >= 2, "the requests finished before the signal: nothing drained"
        for t in threads:
            t.join(60)
        # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly, so the
        # exit status says "terminated"; the log and the answers show it drained first.
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/healthz", timeout=2)
    assert results == [200] * len(payloads), results
    log = server.log_text()
    assert "Waiting for application shutdown" in log and "Finished server process" in log


def test_service_and_cli_import_without_torch():
    """The GPU image carries no torch: the service, predict, bench and the CLI must not need it."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import segserve.service.app, segserve.service.predict, segserve.loadgen\n"
        "from segserve.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--port', '1'])\n"
        "segserve.service.app.create_app()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_speaks_v2_binary_tensors_to_the_live_server(server, capsys):
    from segserve.cli import main

    args = ["bench", "--url", server.url, "--protocol", "v2", "--model", "tiny",
            "--concurrency", "2", "--duration", "1", "--sizes", "48x64,40x40", "--json"]  # fmt: skip
    assert main(args) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["ok"] > 0 and run["ok"] == run["requests"]
    assert set(run["p50_ms_by_size"]) == {"48x64", "40x40"}
    assert run["server_batches"] >= 1  # read from segserve's own /metrics
