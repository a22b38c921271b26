"""The answer formats, rendered from labels and a card without any server."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from segserve.contracts.card import ModelCard
from segserve.service.render import MaskSpecError, RenderSpec, parse_masks, render

CARD = ModelCard(
    name="m", architecture="unet", num_classes=3, class_names=["bg", "cat", "dog"],
    palette=[[0, 0, 0], [200, 0, 0], [0, 200, 0]], mean=[0.5] * 3, std=[0.5] * 3,
    output="labels", size_divisor=16,
)  # fmt: skip
LABELS = np.array([[0, 1, 1], [2, 2, 2]], np.uint8)
RGB = np.full((2, 3, 3), 100, np.uint8)


def test_mask_specs_name_classes_by_name_or_ascii_id():
    assert parse_masks("none", CARD) == [] and parse_masks("all", CARD) == [0, 1, 2]
    assert parse_masks(" dog, 1 ,", CARD) == [2, 1]
    for bad in ("cow", "3", "\u00b2", "\u0967"):
        with pytest.raises(MaskSpecError, match="unknown class"):
            parse_masks(bad, CARD)


def test_png_and_overlay_are_images_of_the_inputs_size():
    timings: dict = {}
    body, media = render(RGB, LABELS, CARD, RenderSpec("png"), {}, timings, 0.0)
    assert media == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), LABELS)
    assert set(timings) == {"postprocess", "encode"}
    body, _ = render(RGB, LABELS, CARD, RenderSpec("overlay"), {}, {}, 0.0)
    overlay = np.asarray(Image.open(io.BytesIO(body)))
    assert overlay.shape == (2, 3, 3) and overlay[0, 0].tolist() == [100, 100, 100]
    assert overlay[0, 1].tolist() == [150, 50, 50]


def test_json_lists_present_classes_with_shares_and_the_requested_masks():
    spec = RenderSpec("json", (1,), "rle")
    body, media = render(RGB, LABELS, CARD, spec, {"model": "m", "version": 2}, {}, 0.0)
    out = json.loads(body)
    assert media == "application/json" and (out["model"], out["version"]) == ("m", 2)
    assert [(c["name"], c["pixels"]) for c in out["classes"]] == [("bg", 1), ("cat", 2), ("dog", 3)]
    assert out["classes"][2]["fraction"] == pytest.approx(0.5)
    assert list(out["masks"]) == ["cat"] and out["masks"]["cat"]["size"] == [2, 3]
    assert "total" in out["timings_ms"]
