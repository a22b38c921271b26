"""Hostile and odd input, in-process: every crafted case gets its 4xx with a JSON reason (or
its 200), none a 5xx, and the server keeps serving. Socket-level cases (header size, slow
senders, keep-alive after errors) are in test_server.py."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from corpus import cases, encode, photo, png_declaring
from PIL import Image

from helpers import await_for, image_bytes, in_process, v2_json
from segserve.service.media.imaging import decode_image
from segserve.service.media.render import resize_labels

PNG = {"Content-Type": "image/png"}
CORPUS = cases()


@pytest.fixture(scope="module")
def app(tiny_repository):
    with in_process(tiny_repository) as a:
        yield a


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_file_of_the_corpus_gets_its_status_and_a_json_reason(app, name):
    data, status = CORPUS[name]
    r = app.post("/segment", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == status, r.text
    if status != 200:
        body = r.json()
        assert body["error"] and body["detail"] and body["request_id"]
    if status == 415:  # the format as its first bytes suggest, and what to send instead
        assert "not accepted; send one of JPEG, PNG, WEBP, BMP, TIFF, GIF" in body["detail"]
    if status == 200:
        assert Image.open(io.BytesIO(r.content)).size == Image.open(io.BytesIO(data)).size


def test_the_server_serves_after_the_whole_corpus(app):
    assert app.get("/healthz").status_code == 200
    assert app.post("/segment", content=image_bytes(30, 40), headers=PNG).status_code == 200


@pytest.mark.parametrize(
    "request_json, detail",
    [
        (
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "UINT8",
                        "shape": [1, 1, 1, 3],
                        "data": [0, -1, 2],
                    }
                ]
            },
            "0..255",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "UINT8",
                        "shape": [1, 1, 1, 3],
                        "data": [0, 300, 2],
                    }
                ]
            },
            "0..255",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "UINT8",
                        "shape": [1, 1, 1, 3],
                        "data": [0.5, 1, 2],
                    }
                ]
            },
            "integers",
        ),
        ({"inputs": [5]}, "inputs.0"),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "parameters": "x"}
                ]
            },
            "parameters",
        ),
        ([1], "request"),
        ({"inputs": [], "outputs": 5}, "inputs"),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}
                ],
                "outputs": 5,
            },
            "outputs",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}
                ],
                "outputs": [{"name": "logits"}],
            },
            "unknown output",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}
                ]
            },
            "UINT8 or BYTES",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [1, 1, 1, 3],
                        "data": [1, 2, 3],
                    }
                ]
            },
            "no input named",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": [-1, 1, 1, 3], "data": []}
                ]
            },
            "shape",
        ),
    ],
)
def test_malformed_v2_requests_get_400_not_500(app, request_json, detail):
    r = app.post("/v2/models/tiny/infer", content=json.dumps(request_json).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and detail in r.json()["detail"]


def test_deeply_nested_v2_json_is_a_400_not_a_recursion_error(app):
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = app.post("/v2/models/tiny/infer", content=deep)
    assert r.status_code == 400 and "invalid inference request" in r.json()["detail"]


def test_binary_v2_data_must_be_exactly_what_the_inputs_declare(app):
    pixels = np.zeros((1, 4, 4, 3), np.uint8)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [1, 4, 4, 3],
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ]
        }
    ).encode()
    head = {"Inference-Header-Content-Length": str(len(header))}
    ok = app.post("/v2/models/tiny/infer", content=header + pixels.tobytes(), headers=head)
    assert ok.status_code == 200
    longer = app.post(
        "/v2/models/tiny/infer", content=header + pixels.tobytes() + b"x", headers=head
    )
    assert longer.status_code == 400 and "declare" in longer.json()["detail"]
    bad_length = app.post(
        "/v2/models/tiny/infer",
        content=header,
        headers={"Inference-Header-Content-Length": "٣".encode()},
    )
    assert bad_length.status_code == 400


def test_many_images_in_one_v2_request_are_refused_whole_and_queue_nothing(app):
    blobs = [base64.b64encode(image_bytes(20, 20, seed=i)).decode() for i in range(64)]
    r = app.post("/v2/models/tiny/infer", json=v2_json(blobs))
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert "limit is 16" in r.json()["detail"]
    assert app.service.registry.get("tiny").batcher.depth == 0


def test_declared_pixels_of_all_images_of_a_request_count_together(tiny_repository):
    with in_process(tiny_repository, max_request_pixels=2_000) as app:
        blobs = [base64.b64encode(png_declaring(40, 40)).decode() for _ in range(2)]
        r = app.post("/v2/models/tiny/infer", json=v2_json(blobs))
        assert r.status_code == 413 and "together" in r.json()["detail"]


def test_a_v2_request_too_big_for_the_queue_is_refused_whole(tiny_repository):
    with in_process(tiny_repository, max_queue=4) as app:
        blobs = [base64.b64encode(image_bytes(20, 20, seed=i)).decode() for i in range(8)]
        r = app.post("/v2/models/tiny/infer", json=v2_json(blobs))
        assert r.status_code == 503 and "queue full" in r.json()["detail"]
        assert app.service.registry.get("tiny").batcher.depth == 0


@pytest.mark.parametrize("masks", ["\u00b2", "\u0967", "1,\u00b9"])
def test_unicode_digits_are_not_class_ids(app, masks):
    r = app.post(
        "/segment",
        params={"format": "json", "masks": masks},
        content=image_bytes(8, 8),
        headers=PNG,
    )
    assert r.status_code == 422 and "unknown class" in r.json()["detail"]


def test_multipart_strictness(app):
    data = image_bytes(20, 20)
    # A text field in any script beside the file is fine.
    ok = app.post("/segment", files={"image": ("x.png", data, "image/png")}, data={"note": "ŝ中文"})
    assert ok.status_code == 200
    form = b'--XX\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n' + data
    truncated = app.post(
        "/segment", content=form, headers={"Content-Type": "multipart/form-data; boundary=XX"}
    )
    assert truncated.status_code == 400 and "truncated" in truncated.json()["detail"]
    no_boundary = app.post(
        "/segment", content=form, headers={"Content-Type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400
    text_field = app.post("/segment", files={"image": (None, "not a file")})
    assert text_field.status_code == 422 and "must be a file" in text_field.json()["detail"]
    for content_type in (";;;", "image", "", "text/plain"):
        r = app.post("/segment", content=data, headers={"Content-Type": content_type})
        assert r.status_code == 415, content_type


def test_images_asked_to_fit_run_scaled_down_and_get_labels_at_their_own_size(tiny_repository):
    with in_process(tiny_repository, fit_pixels=10_000) as app:
        data = encode(photo(200, 300, seed=3), "PNG")
        r = app.post("/segment", params={"scale": "fit"}, content=data, headers=PNG)
        assert r.status_code == 200 and r.headers["x-inference-size"] == "122x81"
        assert r.headers["x-scale"] == "fit" and r.headers["x-tiles"] == "1"
        labels = np.asarray(Image.open(io.BytesIO(r.content)))
        assert labels.shape == (200, 300)
        small = decode_image(data, 10**6, fit_pixels=10_000)
        (expected,) = app.service.registry.get("tiny").engine.segment([small])
        assert np.array_equal(labels, resize_labels(expected, 200, 300))
        fit = {"scale": "fit"}
        body = app.post("/segment", params={"format": "json", **fit}, content=data, headers=PNG)
        inference = {"policy": "fit", "height": 81, "width": 122, "tiles": 1}
        assert body.json()["inference"] == inference
        assert (body.json()["width"], body.json()["height"]) == (300, 200)
        overlay = app.post(
            "/segment", params={"format": "overlay", **fit}, content=data, headers=PNG
        )
        assert Image.open(io.BytesIO(overlay.content)).size == (300, 200)
        native = app.post("/segment", content=data, headers=PNG)  # the model's own policy
        assert (native.headers["x-scale"], native.headers["x-inference-size"]) == (
            "native",
            "300x200",
        )


@pytest.mark.slow  # 5 s of two cores; make test-slow (the 40 MP test there too)
def test_a_12_megapixel_photo_runs_in_tiles_at_its_own_size(app):
    photo_bytes = encode(photo(300, 400).resize((4000, 3000)), "JPEG", quality=85)
    r = app.post("/segment", content=photo_bytes, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (4000, 3000)
    assert r.headers["x-scale"] == "native" and r.headers["x-inference-size"] == "4000x3000"
    assert int(r.headers["x-tiles"]) > 1


def test_a_client_that_leaves_while_queued_costs_no_inference(tiny_repository):
    """The ASGI app called directly: the client's http.disconnect arrives while its image
    waits behind a held run; its job is dropped, never computed, and counted."""

    from test_service import held_engine, post_later, rejected

    with in_process(tiny_repository) as app:
        body = image_bytes(24, 24)
        sent: list[dict] = []

        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def leave_after_sending():
            message = next(messages, None)
            if message is not None:
                return message
            batcher = app.service.registry.get("tiny").batcher
            await await_for(lambda: batcher.depth >= 1, what="the request queued")
            return {"type": "http.disconnect"}

        async def record(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/segment",
            "raw_path": b"/segment",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/png"), (b"host", b"t")],
            "client": ("127.0.0.1", 1),
            "server": ("t", 80),
        }
        with held_engine(app) as held:
            first = post_later(app, "/segment", content=image_bytes(16, 16), headers=PNG)
            assert held.running.wait(30)
            app.run(app.app(scope, leave_after_sending, record))
            held.gate.set()
            assert first.result(60).status_code == 200
        assert sent[0]["status"] == 499
        assert held.runs == [[(16, 16)]]  # only the first request's image ran
        assert rejected(app)["client_gone"] == 1
