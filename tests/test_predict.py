"""`segserve predict` runs the service's own steps: its files are what POST /segment answers,
byte for byte, also for images above max_inference_pixels (run scaled down, labels scaled
back) and for overlays."""

from helpers import image_bytes, in_process
from segserve.service.predict import predict_files
from segserve.service.settings import Settings


def test_predict_writes_exactly_what_segment_answers_even_for_scaled_images(
    tiny_repository, tmp_path
):
    images = {"small.jpg": image_bytes(30, 40, "JPEG"), "large.png": image_bytes(90, 120, seed=3)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    limits = {"max_inference_pixels": 2000, "intra_op_threads": 1}  # 90x120 runs at 38x51
    model = tiny_repository / "tiny" / "2" / "model.onnx"
    paths = [tmp_path / name for name in images]
    labels = predict_files(paths, model, tmp_path / "png", "png", Settings(**limits))
    overlays = predict_files(paths, model, tmp_path / "overlay", "overlay", Settings(**limits))
    with in_process(tiny_repository, **limits) as app:
        for (name, data), label, overlay in zip(images.items(), labels, overlays, strict=True):
            for fmt, written in (("png", label), ("overlay", overlay)):
                r = app.post(
                    "/segment",
                    params={"format": fmt, "model": "tiny", "version": 2},
                    content=data,
                    headers={"Content-Type": "image/png"},
                )
                assert r.status_code == 200
                assert written.read_bytes() == r.content, (name, fmt)
        large = app.post(
            "/segment", content=images["large.png"], headers={"Content-Type": "image/png"}
        )
        assert large.headers["x-inference-size"] == "51x38"  # the case that was scaled
