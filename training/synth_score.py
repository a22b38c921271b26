"""Any segmenter scored on fresh synthetic images: the way the default model is judged, by
the test that serves it over HTTP and by the bench that runs its file through the Engine.

Each image is drawn from `SynthConfig` (a seed no training run used), JPEG-encoded as the data
set stores them, and handed to `segment`, which answers labels at the image's size.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from segserve.contracts.card import SCORES
from segserve.training.metrics import (
    ConfusionMatrix,
    border_background_errors,
    segmentation_scores,
)
from segserve.training.synth import JPEG_QUALITY, SYNTH_CLASSES, SynthConfig, render_sample


def score_segmenter(segment: Callable[[bytes], np.ndarray], config: SynthConfig) -> dict:
    """The paper's four metrics, the IU of each class, and `border_background_wrong`: the
    share of background pixels within 4 px of the image border called some other class."""
    cm = ConfusionMatrix(len(SYNTH_CLASSES))
    wrong = background = 0
    for i in range(config.count):
        image, truth = render_sample(config, i)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        pred, target = np.asarray(segment(buffer.getvalue())), np.asarray(truth)
        cm.update(pred, target)
        w, b = border_background_errors(pred, target)
        wrong, background = wrong + w, background + b
    scores = segmentation_scores(cm.matrix)
    return {
        "images": config.count,
        "seed": config.seed,
        **{k: scores[k] for k in SCORES},
        "per_class_iu": dict(zip(SYNTH_CLASSES, scores["per_class_iu"], strict=True)),
        "border_background_wrong": wrong / max(background, 1),
    }
