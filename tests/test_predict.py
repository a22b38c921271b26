"""`segserve predict` runs the service's own steps: its files are what POST /segment answers,
byte for byte, also for images asked to fit (run scaled down, labels scaled back), for images
larger than one tile (run in tiles at their own size) and for overlays."""

import pytest

from helpers import image_bytes, in_process
from segserve.service.predict import predict_files
from segserve.service.settings import Settings


@pytest.mark.parametrize(
    "scale, large_answer",
    [
        ("fit", {"x-scale": "fit", "x-inference-size": "51x38", "x-tiles": "1"}),
        ("native", {"x-scale": "native", "x-inference-size": "400x300", "x-tiles": "2"}),
    ],
)
def test_predict_writes_exactly_what_segment_answers_scaled_or_in_tiles(
    tiny_repository, tmp_path, scale, large_answer
):
    large = (90, 120) if scale == "fit" else (300, 400)
    images = {"small.jpg": image_bytes(30, 40, "JPEG"), "large.png": image_bytes(*large, seed=3)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    # fit: 90x120 runs at 38x51; native: 300x400 runs in tiles of the smallest side an 80-px
    # halo allows: 320)
    limits = {
        "fit_pixels": 2000,
        "tile_size": 256,
        "arena_shrink_pixels": 50_000,
        "intra_op_threads": 1,
    }
    model = tiny_repository / "tiny" / "2" / "model.onnx"
    paths = [tmp_path / name for name in images]
    labels = predict_files(paths, model, tmp_path / "png", "png", Settings(**limits), scale)
    overlays = predict_files(
        paths, model, tmp_path / "overlay", "overlay", Settings(**limits), scale
    )
    with in_process(tiny_repository, **limits) as app:
        for (name, data), label, overlay in zip(images.items(), labels, overlays, strict=True):
            for fmt, written in (("png", label), ("overlay", overlay)):
                r = app.post(
                    "/segment",
                    params={"format": fmt, "model": "tiny", "version": 2, "scale": scale},
                    content=data,
                    headers={"Content-Type": "image/png"},
                )
                assert r.status_code == 200
                assert written.read_bytes() == r.content, (name, fmt)
        answer = app.post(
            "/segment",
            params={"scale": scale},
            content=images["large.png"],
            headers={"Content-Type": "image/png"},
        )
        assert {k: answer.headers[k] for k in large_answer} == large_answer
