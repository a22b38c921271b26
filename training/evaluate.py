"""`segserve eval`: the paper's four metrics and per-class IU of a checkpoint on a split."""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.data import DataLoader

from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint
from segserve.training.datasets import VOCSegmentation
from segserve.training.transforms import EvalTransform


def run_eval(args: argparse.Namespace) -> dict:
    from segserve.training.train import evaluate, resolve_device

    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    device = resolve_device(args.device)
    dataset = VOCSegmentation(args.data, args.split, EvalTransform(ckpt["mean"], ckpt["std"]))
    if dataset.num_classes != ckpt["num_classes"]:
        raise SystemExit(
            f"the data set has {dataset.num_classes} classes, the checkpoint {ckpt['num_classes']}"
        )
    loader = DataLoader(dataset, batch_size=1, num_workers=0)
    with torch.inference_mode():
        scores = evaluate(
            model.to(device), loader, device, dataset.num_classes, progress=not args.json
        )
    scores.pop("matrix")
    scores.pop("val_loss")
    scores["num_images"] = len(dataset)
    if args.json:
        # NaN is not JSON: absent classes become null.
        scores["per_class_iu"] = [None if math.isnan(v) else v for v in scores["per_class_iu"]]
        print(json.dumps(scores))
    else:
        print(format_table(scores, dataset.class_names))
    return scores


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
    for key, label in (
        ("pixel_accuracy", "pixel acc"),
        ("mean_accuracy", "mean acc"),
        ("mean_iu", "mean IU"),
        ("fw_iu", "f.w. IU"),
    ):
        lines.append(f"{label:<16}{scores[key]:>8.4f}")
    lines.append(f"{'images':<16}{scores['num_images']:>8d}")
    if absent:
        lines.append(
            f"left out of the means (absent from truth and prediction): {', '.join(absent)}"
        )
    return "\n".join(lines)
