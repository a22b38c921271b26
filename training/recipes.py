"""Training defaults per architecture and stage: what `segserve train` uses for every option
the user leaves out.

FCN follows the authors' solvers (fcn.berkeleyvision.org, voc-fcn*/solver.prototxt): SGD,
momentum 0.99, weight decay 5e-4, a fixed learning rate, batch 1 (whole images), biases at
twice the learning rate and without decay (every score and conv layer has
`param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]`), and a learning
rate 100x lower for each finer stage: 1e-10 (32s), 1e-12 (16s from 32s), 1e-14 (8s from
16s), 1e-10 for FCN-8s trained at once with its skips scaled.

Those rates are for a *summed* loss (SoftmaxWithLoss, normalize: false): the gradient is the
sum over every labelled pixel. segserve's loss is the *mean* over labelled pixels (steps that
do not grow with the image size, and no fp16 overflow under AMP), so the same SGD step needs
the rate times the number of pixels: lr_mean = lr_sum * N. With N = 500 * 375 = 187,500 (a
typical PASCAL VOC image, the paper's data) that is 1.875e-5 for FCN-32s, 1.875e-7 for
FCN-16s and 1.875e-9 for FCN-8s. With momentum 0.99 the effective step is lr / (1 - 0.99):
1.9e-3 at 32s. `--loss sum` with `--lr 1e-10` runs the authors' numbers as they are.

U-Net keeps the common modern regime (SGD 0.9, poly decay over random crops).
"""

from __future__ import annotations

from typing import Any

# A typical VOC image: the N of lr_mean = lr_sum * N.
VOC_PIXELS = 500 * 375
# The authors' base_lr for a summed loss at batch 1: staged, each finer stage 100x lower...
PAPER_SUM_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}
# ...and FCN-8s (here also FCN-16s) trained at once from the backbone, skips scaled.
AT_ONCE_SUM_LR = 1e-10

FCN_COMMON: dict[str, Any] = dict(
    optimizer="sgd",
    momentum=0.99,
    weight_decay=5e-4,
    batch_size=1,
    loss="mean",
    bias_lr_mult=2.0,
    bias_decay=False,
    poly_power=0.0,  # 0: a fixed rate, as the solvers
    class_weighting="none",
    crop_size=512,
    scale=(1.0, 1.0),  # whole VOC images (<= 500 px), padded with ignore
)
UNET: dict[str, Any] = dict(
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=8,
    loss="mean",
    bias_lr_mult=1.0,
    bias_decay=True,
    poly_power=0.9,
    crop_size=256,
    scale=(0.5, 2.0),
    class_weighting="none",
)


def fcn_sum_lr(model: str, staged: bool) -> float:
    """The authors' summed-loss rate for `model`: staged (from a coarser FCN) or at once."""
    return PAPER_SUM_LR[model] if staged or model == "fcn32s" else AT_ONCE_SUM_LR


def defaults_for(model: str, staged: bool = False) -> dict[str, Any]:
    """Every training option's default for `model`; `staged`: an FCN-16s/8s that starts
    from a trained coarser FCN (--init-from), else one trained at once from the backbone."""
    if model == "unet":
        return dict(UNET)
    return {**FCN_COMMON, "lr": fcn_sum_lr(model, staged) * VOC_PIXELS}
