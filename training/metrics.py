"""The paper's four segmentation metrics (section 5) from a confusion matrix.

With n_ij = pixels of class i predicted as j and t_i = sum_j n_ij:
pixel accuracy sum n_ii / sum t_i; mean accuracy (1/C) sum n_ii / t_i;
mean IU (1/C) sum n_ii / (t_i + sum_j n_ji - n_ii); frequency-weighted IU.
Classes absent from both truth and prediction are NaN and left out of the means; mean
accuracy also leaves out classes absent from truth (their accuracy is 0/0).
"""

from __future__ import annotations

import math

import numpy as np

from segserve.contracts.card import SCORES
from segserve.contracts.palette import IGNORE_LABEL


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates n_ij over many images; rows are truth, columns prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        pred, target = _as_numpy(pred), _as_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        keep = target != self.ignore_index
        t = target[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(
                f"target labels outside 0..{self.num_classes - 1} (and not {self.ignore_index})"
            )
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f"predicted labels outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def scores(self) -> dict:
        return segmentation_scores(self.matrix)


def segmentation_scores(matrix) -> dict:
    """pixel_accuracy, mean_accuracy, mean_iu, fw_iu and per_class_iu (NaN = absent class)."""
    n = np.asarray(matrix, dtype=np.float64)
    diag = np.diag(n)
    truth = n.sum(axis=1)  # t_i
    predicted = n.sum(axis=0)  # sum_j n_ji
    union = truth + predicted - diag
    total = truth.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class_acc = np.where(truth > 0, diag / truth, np.nan)
        per_class_iu = np.where(union > 0, diag / union, np.nan)
    present = union > 0

    def nanmean(values: np.ndarray) -> float:
        finite = values[~np.isnan(values)]
        return float(finite.mean()) if finite.size else float("nan")

    pixel_accuracy = float(diag.sum() / total) if total else math.nan
    fw_iu = float((truth[present] * per_class_iu[present]).sum() / total) if total else math.nan
    values = (pixel_accuracy, nanmean(per_class_acc), nanmean(per_class_iu), fw_iu)
    return {
        **dict(zip(SCORES, values, strict=True)),
        "per_class_iu": [float(v) for v in per_class_iu],
    }


def border_background_errors(pred, target, width: int = 4) -> tuple[int, int]:
    """(background pixels within `width` px of the image border predicted as some other
    class, background pixels there): a network that never saw image borders in training
    paints objects along them."""
    pred, target = _as_numpy(pred), _as_numpy(target)
    band = np.ones(target.shape, dtype=bool)
    band[width:-width, width:-width] = False
    background = band & (target == 0)
    return int((background & (pred != 0)).sum()), int(background.sum())
