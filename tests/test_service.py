"""The HTTP service in-process: the real app, onnxruntime and batchers behind httpx's
ASGITransport. Where a test needs requests to wait, it holds the engine's next run with an
event (the real onnxruntime still runs once released); nothing sleeps to synchronise."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from helpers import image_bytes, in_process, metric_samples, wait_for
from segserve.contracts.card import ModelCard
from segserve.service.batching.planning import CostModel
from segserve.service.media.imaging import decode_image
from segserve.service.media.render import decode_rle

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def app(tiny_repository):
    # Batches of up to 8, as on a GPU: on CPU the default is 4 (tested below).
    with in_process(tiny_repository, max_batch_size=8, tile_size=None) as a:
        yield a


def session_of(repository, version: int) -> ort.InferenceSession:
    path = repository / "tiny" / str(version) / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(tiny_repository):
    """Labels straight from onnxruntime (the default v2: uint8 in, labels out), one image at
    a time, no batching, no padding: the truth."""
    session = session_of(tiny_repository, 2)

    def labels(data: bytes) -> np.ndarray:
        return session.run(None, {"image": decode_image(data, 10**8)[None]})[0][0]

    return labels


def labels_of(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)))


def rejected(app, **kw) -> dict[str, float]:
    samples = metric_samples(app.get("/metrics", **kw).text).get("segserve_rejected_total", [])
    return {s.labels["reason"]: s.value for s in samples}


@dataclass
class Held:
    gate: threading.Event  # set: the held run (and every later one) goes on
    running: threading.Event  # set once a run has started
    runs: list  # the sizes of every run started while held


@contextmanager
def held_engine(app, name: str = "tiny"):
    """Holds the model's session.runs until the block ends (or `gate` is set)."""
    batcher = app.service.registry.get(name).batcher
    real = batcher.run_batch
    held = Held(threading.Event(), threading.Event(), [])

    def run(batch, sizes):
        held.runs.append(sizes)
        held.running.set()
        assert held.gate.wait(60)
        return real(batch, sizes)

    batcher.run_batch = run
    try:
        yield held
    finally:
        held.gate.set()
        batcher.run_batch = real


def post_later(app, *args, **kw):
    """Send a request without waiting for its answer; `.result()` gives the response."""
    return asyncio.run_coroutine_threadsafe(app.client.post(*args, **kw), app.loop)


def behind_a_held_run(app, payloads: list[bytes]) -> tuple[list, list]:
    """Send `payloads` while the engine is held on another request, wait until they are all
    queued together, then let everything run. Their responses in order, and the sizes of
    every run after the held one."""
    batcher = app.service.registry.get("tiny").batcher
    with held_engine(app) as held:
        first = post_later(app, "/segment", content=image_bytes(16, 16), headers=PNG)
        assert held.running.wait(30)
        later = [post_later(app, "/segment", content=p, headers=PNG) for p in payloads]
        wait_for(lambda: batcher.depth >= len(payloads), what="the requests queued")
        held.gate.set()
        responses = [f.result(60) for f in later]
        assert first.result(60).status_code == 200
    return responses, held.runs[1:]


def test_png_format_returns_the_label_map_with_headers(app, reference):
    data = image_bytes(75, 101, "JPEG")
    r = app.post("/segment", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model"] == "tiny" and r.headers["x-model-version"] == "2"
    assert len(r.headers["x-request-id"]) >= 16
    for stage in ("decode", "preprocess", "queue", "inference", "postprocess", "encode", "total"):
        assert f"{stage};dur=" in r.headers["server-timing"]
    label = Image.open(io.BytesIO(r.content))
    assert label.mode == "P" and label.size == (101, 75)
    assert np.array_equal(np.asarray(label), reference(data))
    given = app.post("/segment", content=data, headers={"X-Request-ID": "abc-123", **PNG})
    assert given.headers["x-request-id"] == "abc-123"


def test_multipart_and_overlay(app):
    data = image_bytes(64, 48)
    r = app.post(
        "/segment", params={"format": "overlay"}, files={"image": ("x.png", data, "image/png")}
    )
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (48, 64)


@pytest.mark.parametrize("encoding", ["png", "rle"])
def test_json_format_with_masks_decodes_back_to_the_label_map(app, reference, encoding):
    data = image_bytes(57, 83, seed=4)
    params = {"format": "json", "masks": "all", "mask_encoding": encoding}
    body = app.post("/segment", params=params, content=data, headers=PNG).json()
    assert (body["model"], body["version"], body["width"], body["height"]) == ("tiny", 2, 83, 57)
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
    params = {"format": "json", "masks": "class1,0"}
    some = app.post("/segment", params=params, content=data, headers=PNG)
    assert set(some.json()["masks"]) == {"class1", "background"}


def test_requests_that_wait_together_are_batched_and_each_gets_its_own_labels(app, reference):
    payloads = [image_bytes(64, 64, seed=i) for i in range(6)]
    before = metric_samples(app.get("/metrics").text)
    responses, _ = behind_a_held_run(app, payloads)
    for data, r in zip(payloads, responses, strict=True):
        assert r.status_code == 200 and np.array_equal(labels_of(r), reference(data))
    after = metric_samples(app.get("/metrics").text)

    def batches(samples) -> tuple[float, float]:
        # No sample before the first batch: run alone, this test starts from none.
        count = next((s.value for s in samples.get("segserve_batch_size_count", [])), 0.0)
        total = next((s.value for s in samples.get("segserve_batch_size_sum", [])), 0.0)
        return count, total

    (c0, s0), (c1, s1) = batches(before), batches(after)
    assert s1 - s0 == 7 and c1 - c0 < 7  # 7 images in fewer runs than images


def test_a_merged_batch_is_padded_and_keeps_the_labels(app, reference):
    """With a GPU-like cost model (runs dear, pixels cheap) different sizes share one run,
    padded to a common size; the labels still agree with lone unpadded runs."""
    model = app.service.registry.get("tiny")
    stacked: list[tuple] = []
    real_batch, real_cost = model.batcher.stack, model.batcher.cost

    def spy(items):
        out = real_batch(items)
        stacked.append(out.shape)
        return out

    payloads = [image_bytes(40 + 3 * i, 70 - 5 * i, seed=20 + i) for i in range(6)]
    model.batcher.stack = spy
    model.batcher.cost = CostModel(per_pixel=1e-12, fixed=1.0)
    try:
        responses, _ = behind_a_held_run(app, payloads)
    finally:
        model.batcher.stack, model.batcher.cost = real_batch, real_cost
    assert any(shape[0] >= 2 for shape in stacked[1:]), stacked
    merged = max(stacked[1:])
    assert merged[1] % 16 == 0 and merged[2] % 16 == 0  # NHWC, padded to the size divisor
    agree = total = 0
    for data, r in zip(payloads, responses, strict=True):
        labels = labels_of(r)
        agree += int((labels == reference(data)).sum())
        total += labels.size
    assert agree / total >= 0.995


def test_an_older_float_input_model_still_serves_the_same_labels(app, tiny_repository, reference):
    card = ModelCard.from_metadata(
        session_of(tiny_repository, 1).get_modelmeta().custom_metadata_map
    )
    assert (card.input_dtype, card.input_layout, card.output) == ("float32", "NCHW", "logits")
    data = image_bytes(61, 47, seed=8)
    old = app.post("/segment", params={"version": 1}, content=data, headers=PNG)
    assert old.status_code == 200 and old.headers["x-model-version"] == "1"
    assert (
        labels_of(old) == reference(data)
    ).mean() >= 0.999  # the same net, normalised on the host


def test_models_listing_and_palette_legend(app):
    listing = app.get("/models").json()
    assert listing["default"] == "tiny" and listing["failed"] == []
    model = app.get("/models/tiny").json()
    assert [c["name"] for c in model["classes"]] == ["background", "class1", "class2", "class3"]
    assert model["classes"][1]["color"] == [20, 235, 5]
    assert model["input"]["size_divisor"] == 16 and len(model["input"]["mean"]) == 3
    assert model["card"]["architecture"] == "unet" and model["card"]["metrics"]["mean_iu"] == 0.7
    assert model["scale"] == {
        "policy": "native",
        "policies": ["native", "fit"],
        "fit_pixels": 1_000_000,
        "tile": 640,
        "halo": 80,
    }  # the tile of this server's provider (CPU), the halo of the card
    wrong = app.post(
        "/segment", params={"scale": "sideways"}, content=image_bytes(8, 8), headers=PNG
    )
    assert wrong.status_code == 422
    legend = app.get("/models/tiny/palette.png")
    assert legend.status_code == 200 and Image.open(io.BytesIO(legend.content)).height >= 4 * 20
    assert legend.headers["x-model"] == "tiny"


def test_health_readiness_and_metrics_exposition(app):
    assert app.get("/healthz").status_code == 200
    assert app.get("/readyz").json()["status"] == "ready"
    text = app.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "segserve_requests",
        "segserve_request_duration_seconds",
        "segserve_stage_duration_seconds",
        "segserve_batch_size",
        "segserve_queue_depth",
        "segserve_inflight_requests",
        "segserve_image_pixels",
        "segserve_rejected",
        "segserve_model_info",
    ):
        assert name in names, name
    infos = [s.labels for s in metric_samples(text)["segserve_model_info"]]
    tiny = {"model": "tiny", "version": "2", "provider": "cpu", "architecture": "unet"}
    assert {**tiny, "variant": "float32"} in infos  # the tiny model has no other variant
    routes = {s.labels["route"] for s in metric_samples(text)["segserve_requests_total"]}
    assert "/segment" in routes and "/models/{name}" in routes  # matched routes, not paths


BROKEN = {
    "truncated.jpg": lambda: image_bytes(64, 64, "JPEG")[:300],
    "bad_crc.png": lambda: image_bytes(32, 32)[:30] + b"\x00\x00" + image_bytes(32, 32)[32:],
    "random.bin": lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "empty": lambda: b"",
    "text.jpg": lambda: b"this is a text file named .jpg\n" * 10,
}


def test_broken_files_get_400_bombs_413_and_the_server_keeps_serving(app, png_bomb):
    before = rejected(app)
    for name, make in BROKEN.items():
        r = app.post("/segment", content=make(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400, name
        body = r.json()
        assert body["error"] == "bad_request" and body["detail"]
        assert body["request_id"] == r.headers["x-request-id"] and r.headers["x-model"] == "tiny"
    bomb = app.post("/segment", content=png_bomb, headers=PNG)
    assert bomb.status_code == 413 and "pixel" in bomb.json()["detail"]
    after = rejected(app)
    assert after["bad_image"] - before.get("bad_image", 0) == len(BROKEN)
    assert after["too_many_pixels"] - before.get("too_many_pixels", 0) == 1
    # A 1x1 image is small, not broken: it is segmented.
    tiny = app.post("/segment", content=image_bytes(1, 1), headers=PNG)
    assert tiny.status_code == 200 and Image.open(io.BytesIO(tiny.content)).size == (1, 1)
    assert app.post("/segment", content=image_bytes(40, 40), headers=PNG).status_code == 200


def test_bad_files_sent_among_good_ones_change_nothing_for_the_good_ones(app, reference):
    good = [image_bytes(64, 64, seed=i) for i in range(6)]
    bad = [BROKEN["truncated.jpg"](), BROKEN["random.bin"]()]
    payloads = good[:3] + bad + good[3:]
    responses = app.many([("POST", "/segment", {"content": d, "headers": PNG}) for d in payloads])
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 400, 200, 200, 200]
    for data, r in zip(good, [r for r in responses if r.status_code == 200], strict=True):
        assert np.array_equal(labels_of(r), reference(data))


def test_parameter_and_routing_errors(app):
    data = image_bytes(16, 16)
    cases = [
        (
            app.post("/segment", params={"model": "nope"}, content=data, headers=PNG),
            404,
            "not_found",
        ),
        (app.post("/segment", params={"version": 7}, content=data, headers=PNG), 404, "not_found"),
        (
            app.post("/segment", params={"format": "gif"}, content=data, headers=PNG),
            422,
            "invalid_parameters",
        ),
        (
            app.post(
                "/segment", params={"format": "json", "masks": "unicorn"}, content=data, headers=PNG
            ),
            422,
            "invalid_parameters",
        ),
        (
            app.post(
                "/segment", params={"format": "json", "masks": "\u00b2"}, content=data, headers=PNG
            ),
            422,
            "invalid_parameters",
        ),
        (
            app.post("/segment", params={"masks": "all"}, content=data, headers=PNG),
            422,
            "invalid_parameters",
        ),
        (
            app.post("/segment", content=data, headers={"Content-Type": "application/json"}),
            415,
            "unsupported_media_type",
        ),
        (
            app.post("/segment", files={"other": ("x.png", data, "image/png")}),
            422,
            "invalid_parameters",
        ),
        (app.get("/models/nope"), 404, "not_found"),
        (app.get("/segment"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"] == code and r.json()["detail"]


def test_cpu_batches_are_small_and_stay_under_the_arena_shrink_size(tiny_repository):
    from segserve.service.settings import Settings

    assert Settings().batch_size_for("cpu") == 4 and Settings().batch_size_for("cuda") == 8
    assert Settings(max_batch_size=2).batch_size_for("cpu") == 2
    three = [image_bytes(64, 64, seed=i) for i in range(3)]  # 4096 pixels each
    for shrink_at, most_per_run in ((10_000, 2), (5_000, 1)):
        with in_process(tiny_repository, arena_shrink_pixels=shrink_at) as app:
            batcher = app.service.registry.get("tiny").batcher
            assert batcher.limits.max_batch_size == 4
            assert batcher.limits.max_batch_pixels == shrink_at - 1
            responses, runs = behind_a_held_run(app, three)
            assert [r.status_code for r in responses] == [200] * 3
            assert max(len(run) for run in runs) == most_per_run, runs
    with in_process(tiny_repository, cpu_mem_arena=False) as app:  # no arena to keep
        limits = app.service.registry.get("tiny").batcher.limits
        assert limits.max_batch_pixels == Settings().max_batch_pixels


def test_a_full_queue_and_an_overloaded_model_answer_503_at_once(tiny_repository):
    with in_process(tiny_repository, max_queue=2) as app:
        with held_engine(app) as held:
            batcher = app.service.registry.get("tiny").batcher
            first = post_later(app, "/segment", content=image_bytes(32, 32), headers=PNG)
            assert held.running.wait(30)
            # A request predicted to miss its deadline is told so now, not at the deadline.
            real_cost, batcher.cost = batcher.cost, CostModel(per_pixel=1.0, fixed=0.0)
            late = app.post("/segment", content=image_bytes(32, 32), headers=PNG)
            assert late.status_code == 503 and "predicted wait" in late.json()["detail"]
            batcher.cost = real_cost
            queued = [
                post_later(app, "/segment", content=image_bytes(32, 32), headers=PNG)
                for _ in range(2)
            ]
            wait_for(lambda: batcher.depth >= 2, what="both queued")
            full = app.post("/segment", content=image_bytes(32, 32), headers=PNG)
            assert full.status_code == 503 and full.json()["error"] == "unavailable"
            assert int(full.headers["retry-after"]) >= 1 and "queue full" in full.json()["detail"]
            held.gate.set()
            assert [f.result(60).status_code for f in [first, *queued]] == [200, 200, 200]
        reasons = rejected(app)
        assert reasons["queue_full"] == 1 and reasons["overloaded"] == 1
        assert app.get("/healthz").status_code == 200


def test_a_request_whose_deadline_passes_while_queued_gets_504(tiny_repository):
    with in_process(tiny_repository, request_timeout_s=1.0) as app:
        with held_engine(app) as held:
            first = post_later(app, "/segment", content=image_bytes(32, 32), headers=PNG)
            assert held.running.wait(30)
            r = app.post("/segment", content=image_bytes(32, 32), headers=PNG)
            assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded"
            # The held one passed its deadline too, while running: its answer is 504 as well.
            assert first.result(60).status_code == 504
            held.gate.set()
            batcher = app.service.registry.get("tiny").batcher
            wait_for(lambda: not batcher.depth and not batcher.running, what="the held run over")
        assert rejected(app)["deadline"] == 2
        assert len(held.runs) == 1  # the given-up job never reached the engine


def test_a_failed_extra_model_is_listed_but_readiness_needs_only_the_required_ones(
    tiny_repository, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with in_process(repo, default_model="tiny") as app:
        listing = app.get("/models").json()
        assert listing["failed"][0]["name"] == "broken"
        assert "tiny" in [m["name"] for m in listing["models"]]
        assert app.get("/readyz").status_code == 200  # the default model serves
        failures = metric_samples(app.get("/metrics").text)["segserve_model_load_failures"]
        # every loaded version is a 0 series (so a recovery reads 1 -> 0), the broken one is 1
        assert {s.labels["model"]: s.value for s in failures if s.value} == {"broken": 1.0}
        assert {s.labels["model"] for s in failures} == {"broken", "tiny"}
        assert app.get("/models/broken").status_code == 404
        assert app.post("/segment", content=image_bytes(16, 16), headers=PNG).status_code == 200
    with in_process(repo, default_model="tiny", required_models="tiny,broken") as app:
        ready = app.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == (
            "required models not loaded: broken"
        )
        assert str(tmp_path) not in ready.text  # no file paths for anyone who asks
        assert app.get("/v2/health/ready").status_code == 503
    with in_process(repo, default_model="broken") as app:
        assert app.get("/readyz").status_code == 503


def test_bodies_over_the_limit_get_413_before_they_are_read_whole(tiny_repository):
    with in_process(tiny_repository, max_body_bytes=300_000) as app:
        big = b"\xff" * 400_000
        assert (
            app.post("/segment", content=big, headers={"Content-Type": "image/jpeg"}).status_code
            == 413
        )

        async def chunks():
            for _ in range(40):
                yield b"\x00" * 10_000

        r = app.post("/segment", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert rejected(app)["body_too_large"] == 2


def test_api_key_guards_inference_models_spec_and_metrics_but_not_probes(tiny_repository):
    with in_process(tiny_repository, api_key="s3cret", metrics_token="scrape") as app:
        data = image_bytes(16, 16)
        for r in (
            app.post("/segment", content=data, headers=PNG),
            app.get("/models"),
            app.get("/v2/models/tiny"),
            app.get("/v2"),
            app.get("/openapi.json"),
            app.get("/metrics"),
            app.post("/segment", content=data, headers={**PNG, "Authorization": "Bearer wrong"}),
            app.get("/models", headers={"Authorization": "Bearer scrape"}),
        ):
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.request.url
            assert r.headers["www-authenticate"] == "Bearer"
        key = {"Authorization": "Bearer s3cret"}
        assert app.post("/segment", content=data, headers={**PNG, **key}).status_code == 200
        assert app.get("/openapi.json", headers=key).json()["info"]["title"] == "segserve"
        assert app.get("/metrics", headers={"Authorization": "Bearer scrape"}).status_code == 200
        assert app.get("/metrics", headers=key).status_code == 200
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs"):
            assert app.get(path).status_code == 200, path  # probes, and the docs page's shell
        assert rejected(app, headers=key)["unauthorized"] == 8
    with in_process(
        tiny_repository, api_key="s3cret", public_metrics=True, public_docs=True
    ) as app:
        assert app.get("/metrics").status_code == 200
        assert app.get("/openapi.json").status_code == 200


def v2_binary_request(pixels: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "labels", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + pixels.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def test_v2_infer_in_binary_and_json_through_the_same_path(app, reference):
    payloads = [image_bytes(48, 64, seed=s) for s in (1, 2)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
    body, headers = v2_binary_request(pixels)
    r = app.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["x-model"] == "tiny"
    size = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:size])
    assert meta["outputs"][0]["shape"] == [2, 48, 64]
    labels = np.frombuffer(r.content[size:], np.uint8).reshape(2, 48, 64)
    for p, lab in zip(payloads, labels, strict=True):
        assert np.array_equal(lab, reference(p))
    encoded = {
        "id": "x1",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(payloads[0]).decode()],
            }
        ],
    }
    out = app.post("/v2/models/tiny/versions/1/infer", json=encoded).json()
    assert out["id"] == "x1" and out["model_version"] == "1"
    old = np.array(out["outputs"][0]["data"]).reshape(48, 64)
    assert (old == reference(payloads[0])).mean() >= 0.999


def test_a_bad_image_through_v2_is_refused_and_counted_like_one_through_segment(app):
    before = rejected(app).get("bad_image", 0)
    bad = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(b"not an image").decode()],
            }
        ]
    }
    r = app.post("/v2/models/tiny/infer", json=bad)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert rejected(app)["bad_image"] == before + 1


def test_liveness_answers_while_the_engine_is_busy_and_requests_queue(tiny_repository):
    """/healthz never waits for a model: with a run held and requests queued behind it,
    it answers (the engine runs in a thread of its own, never on the event loop)."""
    with in_process(tiny_repository) as app, held_engine(app) as held:
        batcher = app.service.registry.get("tiny").batcher
        # One request first, held in its run; the others sent after it cannot join that run.
        sent = [post_later(app, "/segment", content=image_bytes(32, 32), headers=PNG)]
        assert held.running.wait(30)
        sent += [
            post_later(app, "/segment", content=image_bytes(32, 32, seed=i), headers=PNG)
            for i in (1, 2)
        ]
        wait_for(lambda: batcher.depth >= 2, what="requests queued behind the held run")
        assert app.get("/healthz").status_code == 200
        assert not any(f.done() for f in sent)  # they were still waiting meanwhile
        held.gate.set()
        assert [f.result(60).status_code for f in sent] == [200] * 3


def test_a_small_request_beside_a_large_image_waits_for_one_tile_not_for_the_image(
    tiny_repository,
):
    """A 512x512 image in 256-px tiles, one tile a run: a 32x32 request sent while the first
    tile runs is the very next run, ahead of the image's other eight tiles."""
    # (the arena bound at 50,000 px: no image past one tile runs whole)
    with in_process(
        tiny_repository, tile_size=256, max_batch_size=1, arena_shrink_pixels=50_000
    ) as app:
        batcher = app.service.registry.get("tiny").batcher
        with held_engine(app) as held:
            large = post_later(app, "/segment", content=image_bytes(512, 512), headers=PNG)
            assert held.running.wait(30)
            small = post_later(app, "/segment", content=image_bytes(32, 32), headers=PNG)
            wait_for(lambda: batcher.depth >= 1, what="the small request queued")
            held.gate.set()
            answers = [small.result(60), large.result(60)]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[1].headers["x-tiles"] == "9"
        assert held.runs[1] == [(32, 32)] and len(held.runs) == 10
        assert all(
            len(run) == 1 and run[0] != (32, 32) for i, run in enumerate(held.runs) if i != 1
        )
