"""`segserve serve` as users run it: a real uvicorn process on loopback, for what only a
real socket shows (a real protocol client, signals, the process's own imports)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port, image_bytes, run_server, wait_for


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
            np.asarray(
                Image.open(
                    io.BytesIO(
                        c.post("/segment", content=p, headers={"Content-Type": "image/png"}).content
                    )
                )
            )
            for p in payloads
        ]
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
    payloads = [image_bytes(512, 512, seed=i) for i in range(8)]
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
        seen = {"in_flight": 0}

        def all_arrived() -> bool:  # the /metrics request itself is one in flight
            seen["in_flight"] = inflight(server.url) - 1
            return seen["in_flight"] + sum(r is not None for r in results) >= len(payloads)

        wait_for(all_arrived, 30, "all eight requests in flight or answered")
        server.proc.send_signal(signal.SIGTERM)
        assert seen["in_flight"] >= 2, "the requests finished before the signal: nothing drained"
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


def test_sigterm_first_drains_unready_while_serving_then_stops_listening(tiny_repository, tmp_path):
    """With a drain, SIGTERM turns /readyz to 503 at once while /segment still answers, each
    answer closing its connection; SIGINT would skip it. Then the process exits."""
    with run_server(tiny_repository, tmp_path, shutdown_drain_s=1.5) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            before = c.post(
                "/segment", content=image_bytes(32, 32), headers={"Content-Type": "image/png"}
            )
            assert before.status_code == 200 and before.headers.get("connection") != "close"
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: c.get("/readyz").status_code != 200, 10, "turning unready")
            ready = c.get("/readyz")
            assert ready.json()["detail"] == "draining for shutdown"
            during = c.post(
                "/segment", content=image_bytes(32, 32), headers={"Content-Type": "image/png"}
            )
            assert during.status_code == 200 and during.headers["connection"] == "close"
            assert c.get("/healthz").status_code == 200  # alive: only unready
        assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "SIGTERM: unready, serving for 1.5 s more" in server.log_text()


def test_the_first_sigterm_drains_and_sigint_or_a_second_signal_do_not():
    """DrainingServer on its own (no socket): SIGTERM starts the drain and asks uvicorn to
    exit only after it; SIGINT, a second SIGTERM, or no drain at all ask at once."""
    import uvicorn

    from segserve.service.server import DrainingServer

    def server(drain_s: float) -> tuple[DrainingServer, list]:
        drained: list = []
        return DrainingServer(uvicorn.Config(app=None), lambda: drained.append(1), drain_s), drained

    s, drained = server(0.2)
    s.handle_exit(signal.SIGTERM, None)
    assert drained == [1] and not s.should_exit
    wait_for(lambda: s.should_exit, 10, "the end of the drain")
    s, drained = server(30)
    s.handle_exit(signal.SIGTERM, None)
    s.handle_exit(signal.SIGTERM, None)  # a second one: now
    assert drained == [1] and s.should_exit
    s, drained = server(30)
    s.handle_exit(signal.SIGINT, None)
    assert drained == [] and s.should_exit
    s, drained = server(0)
    s.handle_exit(signal.SIGTERM, None)
    assert drained == [] and s.should_exit


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

    args = [
        "bench",
        "--url",
        server.url,
        "--protocol",
        "v2",
        "--model",
        "tiny",
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--sizes",
        "48x64,40x40",
        "--json",
    ]
    assert main(args) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["ok"] > 0 and run["ok"] == run["requests"]
    assert set(run["p50_ms_by_size"]) == {"48x64", "40x40"}
    assert run["server_batches"] >= 1  # read from segserve's own /metrics


def raw_exchange(sock: socket.socket, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send one request on an open connection; (status, body) of the answer."""
    sock.settimeout(timeout)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def post(path: str, body: bytes, content_type: str = "image/png") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def guarded(tiny_repository, tmp_path_factory):
    """A server with short idle limits, and a model that fails on images of odd width."""
    repo = tmp_path_factory.mktemp("guarded")
    shutil.copytree(tiny_repository, repo, dirs_exist_ok=True)
    odd_width_fails(repo / "fails" / "1")
    with run_server(
        repo, tmp_path_factory.mktemp("logs"), idle_timeout_s=1, default_model="tiny"
    ) as s:
        yield s


def odd_width_fails(folder):
    """labels = red channel // 64, through a Reshape that only fits even widths: a real
    onnxruntime error for odd ones."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    from segserve.contracts.card import ModelCard

    folder.mkdir(parents=True)
    nodes = [
        helper.make_node("Split", ["image"], ["r", "g", "b"], axis=3, num_outputs=3),
        helper.make_node("Squeeze", ["r", "axis"], ["red"]),
        helper.make_node("Shape", ["red"], ["shape"]),
        helper.make_node("Reshape", ["red", "pairs"], ["paired"]),
        helper.make_node("Reshape", ["paired", "shape"], ["back"]),
        helper.make_node("BitShift", ["back", "six"], ["labels"], direction="RIGHT"),
    ]
    inits = [
        helper.make_tensor("axis", T.INT64, [1], [3]),
        helper.make_tensor("six", T.UINT8, [], [6]),
        helper.make_tensor("pairs", T.INT64, [4], [0, 0, -1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "fails",
        [helper.make_tensor_value_info("image", T.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("labels", T.UINT8, ["N", "H", "W"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    card = ModelCard(
        name="fails",
        architecture="test",
        num_classes=4,
        class_names=list("abcd"),
        palette=[[0, 0, 0]] * 4,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        output="labels",
        size_divisor=2,
        input_dtype="uint8",
        input_layout="NHWC",
    )
    for k, v in card.to_metadata().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(folder / "model.onnx"))


def test_one_keep_alive_connection_serves_on_after_4xx_and_5xx(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        assert raw_exchange(sock, post("/segment", b"garbage"))[0] == 400
        assert raw_exchange(sock, post("/segment?format=gif", image_bytes(8, 8)))[0] == 422
        status, body = raw_exchange(sock, post("/segment?model=fails", image_bytes(8, 7)))
        assert status == 500 and json.loads(body)["error"] == "internal_error"
        assert b"failed on this input" in body
        assert raw_exchange(sock, post("/segment?model=fails", image_bytes(8, 8)))[0] == 200
        assert raw_exchange(sock, post("/segment", image_bytes(16, 16)))[0] == 200


def test_a_huge_header_gets_431_and_the_server_goes_on(guarded):
    r = httpx.get(guarded.url + "/healthz", headers={"X-Padding": "a" * 100_000})
    assert r.status_code == 431 and r.json()["error"] == "headers_too_large"
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def test_slow_senders_are_cut_off(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a body that never comes
        head = b"POST /segment HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        status, body = raw_exchange(sock, head + b"Content-Length: 1000\r\n\r\n0123456789")
        assert status == 408 and json.loads(body)["error"] == "request_timeout"
    with socket.create_connection((host, int(port))) as sock:  # headers that never end
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        status, body = raw_exchange(sock, b"", timeout=10)
        assert status == 408
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def test_a_provider_named_but_missing_stops_the_server_and_auto_says_which_it_runs_on(
    tiny_repository, tmp_path
):
    env = {
        **os.environ,
        "SEGSERVE_REPOSITORY": str(tiny_repository),
        "SEGSERVE_PROVIDERS": "cuda",
        "SEGSERVE_WARMUP_SHAPES": "32x32",
    }
    cmd = [sys.executable, "-m", "segserve.cli", "serve", "--port", str(free_port())]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "provider cuda is not in this onnxruntime build" in result.stdout + result.stderr
    with run_server(tiny_repository, tmp_path, providers="auto") as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["providers"] == ["cpu"]


@pytest.mark.parametrize("name", ["API_KEY", "METRICS_TOKEN"])
def test_a_key_set_but_empty_stops_the_server_at_start_and_says_which(tiny_repository, name):
    """SEGSERVE_API_KEY="" (a variable exported from an unset one) would either serve openly
    or refuse every call: the server does neither, it does not start, and says why."""
    command = [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(tiny_repository),
               "--port", str(free_port())]  # fmt: skip
    env = {**os.environ, f"SEGSERVE_{name}": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"SEGSERVE_{name} is set but empty: give it a value, or unset it" in done.stderr
    assert "Traceback" not in done.stderr
