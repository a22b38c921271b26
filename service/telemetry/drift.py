"""Drift without labels: what a version predicts on live traffic, against what it predicted
on its model's check set.

Per model and version: pixels per predicted class and images per dominant class (counters,
for dashboards and rates), and a drift score: the total variation distance between the class
mix of the last `window` images (each image's class fractions, averaged) and the class mix
the version predicted on the check set (0: the same mix; 1: no class in common). A camera
that fails to black, a new kind of scene or a broken upstream resize all move the mix long
before anyone labels an image. Without a check set there is no reference and no score.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance of two distributions over the same classes: in [0, 1]."""
    return float(0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


class DriftWindow:
    """The last `size` images' class fractions of one model version, and its reference."""

    def __init__(self, size: int, reference: list[float] | None) -> None:
        self.fractions: deque[np.ndarray] = deque(maxlen=size)
        self.reference = None if reference is None else np.asarray(reference, np.float64)

    def observe(self, counts: np.ndarray) -> None:
        total = counts.sum()
        if total > 0:
            self.fractions.append(counts / total)

    def score(self) -> float | None:
        """The drift score now, or None without a reference or an image."""
        if self.reference is None or not self.fractions:
            return None
        return total_variation(np.mean(self.fractions, axis=0), self.reference)
