"""The service against a real `segserve serve` process (uvicorn) on loopback."""

from __future__ import annotations

import base64
import io
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from helpers import image_bytes, run_server
from segserve.contracts.card import ModelCard
from segserve.service.imaging import decode_image, decode_rle, preprocess


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory):
    with run_server(tiny_repository, tmp_path_factory.mktemp("logs"), max_queue_delay_ms=20) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_repository):
    """Labels straight from onnxruntime, one image at a time, no padding: the truth."""
    session = ort.InferenceSession(
        str(tiny_repository / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)

    def labels(data: bytes) -> np.ndarray:
        rgb = decode_image(data, 10**8)
        return session.run(None, {"image": preprocess([rgb], card.mean, card.std)})[0][0].argmax(0)

    return labels


def metric_samples(text: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def test_png_format_returns_the_label_map_with_headers(server, reference):
    data = image_bytes(75, 101, "JPEG")
    r = server.client().post("/segment", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model"] == "tiny" and r.headers["x-model-version"] == "1"
    timing = r.headers["server-timing"]
    for stage in ("decode", "queue", "inference", "postprocess", "total"):
        assert f"{stage};dur=" in timing
    label = Image.open(io.BytesIO(r.content))
    assert label.mode == "P" and label.size == (101, 75)
    assert np.array_equal(np.asarray(label), reference(data))


def test_multipart_and_overlay(server):
    data = image_bytes(64, 48)
    r = server.client().post(
        "/segment", params={"format": "overlay"}, files={"image": ("x.png", data, "image/png")}
    )
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (48, 64)


@pytest.mark.parametrize("encoding", ["png", "rle"])
def test_json_format_with_masks_decodes_back_to_the_label_map(server, reference, encoding):
    data = image_bytes(57, 83, seed=4)
    r = server.client().post(
        "/segment",
        params={"format": "json", "masks": "all", "mask_encoding": encoding},
        content=data,
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["version"], body["width"], body["height"]) == ("tiny", 1, 83, 57)
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_png"]))))
    assert np.array_equal(labels, reference(data))
    assert sum(c["pixels"] for c in body["classes"]) == 57 * 83
    assert abs(sum(c["fraction"] for c in body["classes"]) - 1) < 1e-9
    rebuilt = np.full(labels.shape, 255)
    for cid, name in enumerate(["background", "class1", "class2", "class3"]):
        m = body["masks"][name]
        mask = (
            decode_rle(m)
            if encoding == "rle"
            else np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))).astype(bool)
        )
        rebuilt[mask] = cid
    assert np.array_equal(rebuilt, labels)
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "postprocess", "total"}
    some = server.client().post(
        "/segment",
        params={"format": "json", "masks": "class1,0"},
        content=data,
        headers={"Content-Type": "image/png"},
    )
    assert set(some.json()["masks"]) == {"class1", "background"}


def test_32_concurrent_mixed_sizes_are_batched_and_all_correct(server, reference):
    sizes = [(64, 64), (60, 70), (128, 96), (33, 47), (120, 128), (64, 60), (100, 100), (97, 31)]
    payloads = [image_bytes(*sizes[i % len(sizes)], seed=i) for i in range(32)]
    before = metric_samples(server.client().get("/metrics").text)
    with (
        httpx.Client(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=32)
        ) as client,
        ThreadPoolExecutor(32) as pool,
    ):
        responses = list(
            pool.map(
                lambda d: client.post("/segment", content=d, headers={"Content-Type": "image/png"}),
                payloads,
            )
        )
    for data, r in zip(payloads, responses, strict=True):
        assert r.status_code == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), reference(data))
    after = metric_samples(server.client().get("/metrics").text)

    def multi_request_batches(samples):
        buckets = {
            s.labels["le"]: s.value
            for s in samples["segserve_batch_size_bucket"]
            if s.labels["model"] == "tiny"
        }
        return buckets["+Inf"] - buckets["1.0"]

    assert multi_request_batches(after) > multi_request_batches(before)


def test_padding_in_a_batch_does_not_change_the_labels(server, reference):
    """Batched-and-padded labels against lone unpadded runs: agreement on >= 99.5 % of pixels."""
    payloads = [image_bytes(90 + 3 * i, 120 - 5 * i, seed=20 + i) for i in range(8)]
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda d: client.post("/segment", content=d, headers={"Content-Type": "image/png"}),
                payloads,
            )
        )
    agree = total = 0
    for data, r in zip(payloads, responses, strict=True):
        labels = np.asarray(Image.open(io.BytesIO(r.content)))
        agree += int((labels == reference(data)).sum())
        total += labels.size
    assert agree / total >= 0.995


def test_models_listing_and_palette_legend(server):
    c = server.client()
    listing = c.get("/models").json()
    assert listing["default"] == "tiny" and listing["failed"] == []
    model = c.get("/models/tiny").json()
    assert [cl["name"] for cl in model["classes"]] == ["background", "class1", "class2", "class3"]
    assert model["classes"][1]["color"] == [20, 235, 5]
    assert model["input"]["size_divisor"] == 16 and len(model["input"]["mean"]) == 3
    assert model["card"]["architecture"] == "unet" and model["card"]["metrics"]["mean_iu"] == 0.7
    legend = c.get("/models/tiny/palette.png")
    assert legend.status_code == 200 and Image.open(io.BytesIO(legend.content)).height >= 4 * 20


def test_health_readiness_and_metrics_exposition(server):
    c = server.client()
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").json()["status"] == "ready"
    text = c.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("segserve_requests", "segserve_request_duration_seconds", "segserve_stage_duration_seconds", "segserve_batch_size",
                 "segserve_queue_depth", "segserve_inflight_requests", "segserve_image_pixels", "segserve_rejected",
                 "segserve_model_info"):  # fmt: skip
        assert name in names, name
    info = metric_samples(text)["segserve_model_info"][0]
    assert info.labels == {
        "model": "tiny",
        "version": "1",
        "provider": "cpu",
        "architecture": "unet",
    }
    stages = {
        s.labels["stage"] for s in metric_samples(text)["segserve_stage_duration_seconds_count"]
    }
    assert stages >= {"decode", "queue", "preprocess", "inference", "encode"}


BROKEN = {
    "truncated.jpg": lambda: image_bytes(64, 64, "JPEG")[:300],
    "bad_crc.png": lambda: image_bytes(32, 32)[:30] + b"\x00\x00" + image_bytes(32, 32)[32:],
    "random.bin": lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "empty": lambda: b"",
    "text.jpg": lambda: b"this is a text file named .jpg\n" * 10,
}


def test_broken_files_get_4xx_and_the_server_stays_healthy(server, png_bomb):
    c = server.client()
    for name, make in BROKEN.items():
        r = c.post("/segment", content=make(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400, name
        assert r.json()["error"] == "bad_request" and r.json()["detail"]
        assert r.headers["x-model"] == "tiny"
    bomb = c.post("/segment", content=png_bomb, headers={"Content-Type": "image/png"})
    assert bomb.status_code == 413 and "pixel" in bomb.json()["detail"]
    # A 1x1 image is small, not broken: it is segmented.
    tiny = c.post("/segment", content=image_bytes(1, 1), headers={"Content-Type": "image/png"})
    assert tiny.status_code == 200 and Image.open(io.BytesIO(tiny.content)).size == (1, 1)
    assert c.get("/healthz").status_code == 200
    assert (
        c.post(
            "/segment", content=image_bytes(40, 40), headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )


def test_bad_input_does_not_harm_the_batch_it_would_have_joined(server, reference):
    good = [image_bytes(64, 64, seed=i) for i in range(6)]
    bad = [BROKEN["truncated.jpg"](), BROKEN["random.bin"]()]
    payloads = good[:3] + bad + good[3:]
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda d: client.post("/segment", content=d, headers={"Content-Type": "image/png"}),
                payloads,
            )
        )
    codes = [r.status_code for r in responses]
    assert codes == [200, 200, 200, 400, 400, 200, 200, 200]
    for data, r in zip(good, [r for r in responses if r.status_code == 200], strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), reference(data))


def test_parameter_and_routing_errors(server):
    c = server.client()
    data, png = image_bytes(16, 16), {"Content-Type": "image/png"}
    cases = [
        (c.post("/segment", params={"model": "nope"}, content=data, headers=png), 404, "not_found"),
        (c.post("/segment", params={"version": 7}, content=data, headers=png), 404, "not_found"),
        (
            c.post("/segment", params={"format": "gif"}, content=data, headers=png),
            422,
            "invalid_parameters",
        ),
        (
            c.post(
                "/segment", params={"format": "json", "masks": "unicorn"}, content=data, headers=png
            ),
            422,
            "invalid_parameters",
        ),
        (
            c.post("/segment", params={"masks": "all"}, content=data, headers=png),
            422,
            "invalid_parameters",
        ),
        (
            c.post("/segment", content=data, headers={"Content-Type": "application/json"}),
            415,
            "unsupported_media_type",
        ),
        (
            c.post("/segment", files={"other": ("x.png", data, "image/png")}),
            422,
            "invalid_parameters",
        ),
        (c.get("/models/nope"), 404, "not_found"),
        (c.get("/segment"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"] == code and r.json()["detail"]


def test_limits_full_queue_and_failed_models(tiny_repository, tmp_path, png_bomb):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    settings = {
        "max_queue": 1,
        "max_batch_size": 1,
        "max_queue_delay_ms": 0,
        "max_body_bytes": 300_000,
        "default_model": "tiny",
    }
    with run_server(repo, tmp_path, wait_ready=False, **settings) as server:
        c = server.client()
        time.sleep(1.0)
        # A broken model is reported, the others serve; readiness says why it is not ready.
        listing = c.get("/models").json()
        assert listing["failed"][0]["name"] == "broken" and "tiny" in [
            m["name"] for m in listing["models"]
        ]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "broken" in ready.json()["detail"]
        assert "could not load" in server.log_text()
        assert c.get("/models/broken").status_code == 404
        # 413 before the body is read whole: by Content-Length and for a chunked body.
        big = b"\xff" * 400_000
        assert (
            c.post("/segment", content=big, headers={"Content-Type": "image/jpeg"}).status_code
            == 413
        )

        def chunks():
            for _ in range(40):
                yield b"\x00" * 10_000

        r = c.post("/segment", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        # The queue holds one request: a burst of large images overflows it at once.
        payload = image_bytes(300, 300, "JPEG")
        with ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(
                    lambda _: httpx.post(
                        server.url + "/segment",
                        content=payload,
                        headers={"Content-Type": "image/jpeg"},
                        timeout=60,
                    ),
                    range(16),
                )
            )
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        full = next(r for r in responses if r.status_code == 503)
        assert full.headers["retry-after"] and full.json()["error"] == "unavailable"
        assert c.get("/healthz").status_code == 200
        rejected = {
            s.labels["reason"]: s.value
            for s in metric_samples(c.get("/metrics").text)["segserve_rejected_total"]
        }
        assert rejected["queue_full"] >= 1 and rejected["body_too_large"] >= 2


def test_deadline_gives_504(tiny_repository, tmp_path):
    with run_server(tiny_repository, tmp_path, request_timeout_s=0.002) as server:
        r = server.client().post(
            "/segment", content=image_bytes(256, 256), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded"
        assert server.client().get("/healthz").status_code == 200


def test_api_key_guards_inference_but_not_health(tiny_repository, tmp_path):
    with run_server(tiny_repository, tmp_path, api_key="s3cret") as server:
        c = server.client()
        data, png = image_bytes(16, 16), {"Content-Type": "image/png"}
        for r in (c.post("/segment", content=data, headers=png), c.get("/models"), c.get("/v2/models/tiny"),
                  c.post("/segment", content=data, headers={**png, "Authorization": "Bearer wrong"})):  # fmt: skip
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert (
            c.post(
                "/segment", content=data, headers={**png, "Authorization": "Bearer s3cret"}
            ).status_code
            == 200
        )
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200 and c.get("/v2/health/live").status_code == 200


def test_tritonclient_round_trip(server, reference):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["name"] == "labels"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    payloads = [image_bytes(48, 64, seed=s) for s in (1, 2)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
    for binary in (True, False):
        inp = triton.InferInput("image", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(
            "tiny", [inp], outputs=[triton.InferRequestedOutput("labels", binary_data=binary)]
        )
        labels = result.as_numpy("labels")
        assert labels.shape == (2, 48, 64)
        for p, lab in zip(payloads, labels, strict=True):
            assert np.array_equal(lab, reference(p))
    encoded = triton.InferInput("image", [1], "BYTES")
    encoded.set_data_from_numpy(np.array([payloads[0]], dtype=object))
    labels = client.infer("tiny", [encoded]).as_numpy("labels")
    assert np.array_equal(labels[0], reference(payloads[0]))
    with pytest.raises(triton.InferenceServerException):
        client.infer("nope", [inp])


def test_sigterm_drains_queued_requests_then_exits(tiny_repository, tmp_path):
    payloads = [image_bytes(256, 256, seed=i) for i in range(8)]
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
        time.sleep(0.3)  # the requests are in: queued or running
        server.proc.send_signal(signal.SIGTERM)
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
    """The GPU image carries no torch: service/, predict, bench and the CLI must not need it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import segserve.service.app, segserve.service.predict, segserve.loadgen\n"
        "from segserve.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--port', '1'])\n"
        "segserve.service.app.create_app()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
