"""Evaluation: the paper's four metrics and per-class IU of a network on a split.

`evaluate` is what training calls after each epoch (and, under DDP, all-reduces across
ranks); `evaluate_checkpoint` is `segserve eval` on a saved checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from segserve.contracts.card import SCORE_LABELS
from segserve.contracts.palette import IGNORE_LABEL
from segserve.errors import UserError
from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint
from segserve.training.datasets import VOCSegmentation
from segserve.training.metrics import ConfusionMatrix, segmentation_scores
from segserve.training.transforms import EvalTransform


class TrainingSetupError(UserError, ValueError):
    """A device, a precision, a data set or a starting point that does not fit the run asked
    for (train and eval refuse it before any work)."""


def resolve_device(choice: str) -> torch.device:
    """`auto`: CUDA when torch sees one (the local rank's under torchrun), else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingSetupError("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def input_layout(model: nn.Module) -> torch.memory_format:
    """The memory format to feed `model`: channels-last when its convolutions were made so
    (training with mixed precision does), which is what oneDNN / tensor cores run fastest."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, num_classes: int, progress: bool = False
) -> dict:
    """Val loss and the four metrics; images run one at a time at their own size. Under
    DDP every rank sees its own share and the counts are summed across ranks."""
    from tqdm import tqdm

    model.eval()
    cm = ConfusionMatrix(num_classes)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="sum")
    loss_sum, counted, images = 0.0, 0, 0
    layout = input_layout(model)
    for image, target in tqdm(loader, desc="val", leave=False, disable=not progress):
        image, target = image.to(device).contiguous(memory_format=layout), target.to(device)
        logits = model(image)
        loss_sum += float(criterion(logits.float(), target))
        counted += int((target != IGNORE_LABEL).sum())
        images += image.shape[0]
        cm.update(logits.argmax(1).cpu(), target.cpu())
    matrix = torch.from_numpy(cm.matrix).to(device)
    stats = torch.tensor([loss_sum, counted, images], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(matrix)
        dist.all_reduce(stats)
    scores = segmentation_scores(matrix.cpu().numpy())
    scores["val_loss"] = float(stats[0] / max(stats[1], 1))
    scores["pixels"] = int(matrix.sum())  # labelled pixels scored (every rank's, under DDP)
    scores["images"] = int(stats[2])  # images scored, every rank's: each val image once
    scores["matrix"] = matrix.cpu().numpy()
    return scores


def evaluate_checkpoint(
    data: Path, checkpoint: Path, split: str = "val", device: str = "auto", as_json: bool = False
) -> dict:
    """`segserve eval`: print the table (or one JSON object) and return the scores."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    dev = resolve_device(device)
    dataset = VOCSegmentation(data, split, EvalTransform(ckpt["mean"], ckpt["std"]))
    if dataset.num_classes != ckpt["num_classes"]:
        raise TrainingSetupError(
            f"the data set has {dataset.num_classes} classes, the checkpoint {ckpt['num_classes']}"
        )
    loader = DataLoader(dataset, batch_size=1, num_workers=0)
    with torch.inference_mode():
        scores = evaluate(model.to(dev), loader, dev, dataset.num_classes, progress=not as_json)
    scores.pop("val_loss")
    scores["num_images"] = scores.pop("images")
    shown = {k: v for k, v in scores.items() if k != "matrix"}
    if as_json:
        # NaN is not JSON: absent classes become null.
        shown["per_class_iu"] = [None if math.isnan(v) else v for v in shown["per_class_iu"]]
        print(json.dumps(shown))
    else:
        print(format_table(shown, dataset.class_names))
    return scores  # with the confusion matrix (C x C, rows = truth), which is not printed


def format_table(scores: dict, class_names: list[str]) -> str:
    lines = [f"{'class':<16}{'IU':>8}"]
    absent = []
    for name, iu in zip(class_names, scores["per_class_iu"], strict=True):
        if math.isnan(iu):
            absent.append(name)
            lines.append(f"{name:<16}{'-':>8}")
        else:
            lines.append(f"{name:<16}{iu:>8.4f}")
    lines.append("-" * 24)
    for key, label in SCORE_LABELS.items():
        lines.append(f"{label:<16}{scores[key]:>8.4f}")
    lines.append(f"{'images':<16}{scores['num_images']:>8d}")
    if absent:
        lines.append(
            f"left out of the means (absent from truth and prediction): {', '.join(absent)}"
        )
    return "\n".join(lines)
