"""Scoring a segmenter on fresh synthetic images: what it is handed and what the scores say."""

import io

import numpy as np
import pytest
from PIL import Image

from segserve.training.synth import SYNTH_CLASSES, SynthConfig, render_sample
from segserve.training.synth_score import score_segmenter

CONFIG = SynthConfig(count=3, seed=99, min_size=64, max_size=96)


def truth(i: int) -> np.ndarray:
    return np.asarray(render_sample(CONFIG, i)[1])


def test_the_segmenter_gets_each_image_as_jpeg_and_a_perfect_one_scores_one():
    seen = []

    def perfect(jpeg: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.mode == "RGB"
        seen.append(image.size)
        return truth(len(seen) - 1)

    scores = score_segmenter(perfect, CONFIG)
    assert seen == [render_sample(CONFIG, i)[0].size for i in range(CONFIG.count)]
    assert scores["mean_iu"] == pytest.approx(1.0) and scores["pixel_accuracy"] == 1.0
    assert scores["border_background_wrong"] == 0.0
    assert list(scores["per_class_iu"]) == list(SYNTH_CLASSES)
    assert (scores["images"], scores["seed"]) == (3, 99)


def test_painting_a_class_along_the_border_is_what_the_border_rule_counts():
    calls = iter(range(CONFIG.count))

    def framed(jpeg: bytes) -> np.ndarray:
        labels = truth(next(calls)).copy()
        labels[:2, :] = 1  # a two-pixel stripe of "disc" along the top edge
        return labels

    scores = score_segmenter(framed, CONFIG)
    stripe = sum(int((truth(i)[:2] == 0).sum()) for i in range(CONFIG.count))
    band = 0
    for i in range(CONFIG.count):
        inner = np.ones(truth(i).shape, dtype=bool)
        inner[4:-4, 4:-4] = False
        band += int((inner & (truth(i) == 0)).sum())
    assert scores["border_background_wrong"] == pytest.approx(stripe / band)
    assert 0 < scores["border_background_wrong"] < 1 and scores["mean_iu"] < 1
