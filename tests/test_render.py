"""The answer formats, rendered from labels and a card without any server, and the
encoders beneath them."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from segserve.contracts.card import ModelCard
from segserve.contracts.palette import voc_palette
from segserve.service.media.legend import legend_png
from segserve.service.media.render import (
    MaskSpecError,
    RenderSpec,
    class_stats,
    decode_rle,
    encode_label_png,
    encode_mask_png,
    encode_rle,
    overlay,
    parse_masks,
    render,
    resize_labels,
)
from segserve.service.telemetry.clock import Timings

CARD = ModelCard(
    name="m",
    architecture="unet",
    num_classes=3,
    class_names=["bg", "cat", "dog"],
    palette=[[0, 0, 0], [200, 0, 0], [0, 200, 0]],
    mean=[0.5] * 3,
    std=[0.5] * 3,
    output="labels",
    size_divisor=16,
)
LABELS = np.array([[0, 1, 1], [2, 2, 2]], np.uint8)
RGB = np.full((2, 3, 3), 100, np.uint8)


def test_mask_specs_name_classes_by_name_or_ascii_id():
    assert parse_masks("none", CARD) == [] and parse_masks("all", CARD) == [0, 1, 2]
    assert parse_masks(" dog, 1 ,", CARD) == [2, 1]
    for bad in ("cow", "3", "\u00b2", "\u0967"):
        with pytest.raises(MaskSpecError, match="unknown class"):
            parse_masks(bad, CARD)


def test_png_and_overlay_keep_the_labels_size_and_time_their_stages():
    timings = Timings()
    body, media = render(RGB, LABELS, CARD, RenderSpec("png"), {}, timings)
    assert media == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), LABELS)
    assert [s.value for s in timings.seconds] == ["encode"]
    timings = Timings()
    body, _ = render(RGB, LABELS, CARD, RenderSpec("overlay"), {}, timings)
    assert [s.value for s in timings.seconds] == ["postprocess", "encode"]
    overlay = np.asarray(Image.open(io.BytesIO(body)))
    assert overlay.shape == (2, 3, 3) and overlay[0, 0].tolist() == [100, 100, 100]
    assert overlay[0, 1].tolist() == [150, 50, 50]


def test_json_lists_present_classes_with_shares_and_the_requested_masks():
    spec = RenderSpec("json", (1,), "rle")
    body, media = render(RGB, LABELS, CARD, spec, {"model": "m", "version": 2}, Timings())
    out = json.loads(body)
    assert media == "application/json" and (out["model"], out["version"]) == ("m", 2)
    assert [(c["name"], c["pixels"]) for c in out["classes"]] == [("bg", 1), ("cat", 2), ("dog", 3)]
    assert out["classes"][2]["fraction"] == pytest.approx(0.5)
    assert list(out["masks"]) == ["cat"] and out["masks"]["cat"]["size"] == [2, 3]
    assert set(out["timings_ms"]) == {"postprocess", "total"}


def test_label_png_is_mode_p_with_the_palette_and_exact_size():
    labels = np.random.default_rng(0).integers(0, 4, (33, 51)).astype(np.uint8)
    palette = [[0, 0, 0], [10, 20, 30], [40, 50, 60], [70, 80, 90]]
    image = Image.open(io.BytesIO(encode_label_png(labels, palette)))
    assert image.mode == "P" and image.size == (51, 33)
    assert np.array_equal(np.asarray(image), labels)
    assert image.getpalette()[3:12] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert image.getpalette()[255 * 3 : 256 * 3] == voc_palette()[255]


def test_masks_decode_back_to_the_label_map():
    labels = np.random.default_rng(1).integers(0, 3, (17, 23)).astype(np.uint8)
    labels[0, 0] = 1  # a run that starts with the class
    for cid in range(3):
        mask = labels == cid
        png = Image.open(io.BytesIO(encode_mask_png(mask)))
        assert png.mode == "1" and np.array_equal(np.asarray(png), mask)
        rle = encode_rle(mask)
        assert np.array_equal(decode_rle(rle), mask)
        # The real COCO decoder reads it too.
        coco = coco_mask.frPyObjects(rle, *rle["size"])
        assert np.array_equal(coco_mask.decode(coco).astype(bool), mask)


def test_overlay_blends_only_foreground_and_class_stats_count():
    rgb = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    out = overlay(rgb, labels, [[0, 0, 0], [200, 0, 0]])
    assert out[1, 1].tolist() == [100, 100, 100] and out[0, 0].tolist() == [150, 50, 50]
    assert class_stats(labels, 3).tolist() == [15, 1, 0]


def test_labels_come_back_at_a_size_by_nearest_neighbour():
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    big = resize_labels(labels, 4, 6)
    assert big.shape == (4, 6) and set(np.unique(big)) == {0, 1, 2, 3}  # no averaged ids
    assert resize_labels(labels, 2, 2) is labels


def test_the_legend_has_a_swatch_of_each_class_colour():
    image = Image.open(io.BytesIO(legend_png(CARD.class_names, CARD.palette))).convert("RGB")
    colours = {c for _, c in image.getcolors(10_000)}
    assert all(tuple(c) in colours for c in CARD.palette)
    assert image.height >= 22 * CARD.num_classes
