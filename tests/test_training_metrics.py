import math

import numpy as np
import pytest
import torch

from segserve.training.metrics import ConfusionMatrix, border_background_errors, segmentation_scores


def test_scores_match_hand_computed_values():
    # rows = truth, cols = prediction
    n = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = segmentation_scores(n)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)  # class 2 absent: left out
    iu0, iu1 = 3 / (4 + 5 - 3), 4 / (6 + 5 - 4)
    assert s["per_class_iu"][:2] == pytest.approx([iu0, iu1])
    assert math.isnan(s["per_class_iu"][2])
    assert s["mean_iu"] == pytest.approx((iu0 + iu1) / 2)
    assert s["fw_iu"] == pytest.approx((4 * iu0 + 6 * iu1) / 10)


def test_class_predicted_but_absent_from_truth_counts_as_zero_iu():
    n = np.array([[5, 1], [0, 0]])
    s = segmentation_scores(n)
    assert s["per_class_iu"] == pytest.approx([5 / 6, 0.0])
    assert s["mean_iu"] == pytest.approx(5 / 12)
    assert s["mean_accuracy"] == pytest.approx(5 / 6)  # 0/0 accuracy is left out


def test_confusion_matrix_ignores_255_and_accepts_tensors():
    target = np.array([[0, 1, 255], [2, 2, 255]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, torch.from_numpy(target))
    expected = np.zeros((3, 3), int)
    expected[0, 0] = expected[1, 2] = expected[2, 2] = expected[2, 1] = 1
    assert (cm.matrix == expected).all()
    cm.update(pred.numpy(), target)
    assert cm.matrix.sum() == 8
    assert cm.scores()["pixel_accuracy"] == pytest.approx(0.5)


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="target labels"):
        cm.update(np.zeros(3), np.array([0, 5, 1]))
    with pytest.raises(ValueError, match="predicted"):
        cm.update(np.array([0, 7, 1]), np.zeros(3))


def test_perfect_prediction_scores_one_and_empty_is_nan():
    y = np.random.default_rng(0).integers(0, 4, (20, 20))
    cm = ConfusionMatrix(4)
    cm.update(y, y)
    s = cm.scores()
    assert s["pixel_accuracy"] == s["mean_accuracy"] == s["mean_iu"] == s["fw_iu"] == 1.0
    assert math.isnan(segmentation_scores(np.zeros((3, 3)))["mean_iu"])


def test_border_errors_count_background_called_something_else_near_the_border():
    target = np.zeros((20, 20), np.uint8)
    target[8:12, 8:12] = 1  # an object in the middle, far from the border
    pred = target.copy()
    pred[0, :5] = 2  # five background pixels on the top edge painted as class 2
    pred[10, 10] = 0  # an error inside does not count here
    wrong, background = border_background_errors(pred, target, width=4)
    assert background == 20 * 20 - 12 * 12 and wrong == 5
