"""Checkpoints: everything export needs to rebuild and describe a trained network."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segserve.contracts.architectures import MODEL_NAMES
from segserve.contracts.card import IMAGENET_MEAN, IMAGENET_STD
from segserve.errors import UserError
from segserve.models import build_model

REQUIRED_KEYS = (
    "architecture",
    "model_options",
    "num_classes",
    "class_names",
    "palette",
    "mean",
    "std",
    "state_dict",
)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def checkpoint_fields(
    model: nn.Module,
    architecture: str,
    model_options: dict,
    class_names: list[str],
    palette: list[list[int]],
    metrics: dict | None = None,
    trained_on: str = "unknown",
    mean: list[float] = IMAGENET_MEAN,
    std: list[float] = IMAGENET_STD,
    **extra,
) -> dict:
    """What a checkpoint holds: the weights and every field the model card is made of
    (ModelCard.from_checkpoint reads them), plus `extra` (epoch, optimiser state, ...)."""
    return dict(
        architecture=architecture,
        model_options=model_options,
        num_classes=len(class_names),
        class_names=list(class_names),
        palette=palette,
        mean=mean,
        std=std,
        state_dict=model.state_dict(),
        metrics=metrics or {},
        trained_on=trained_on,
        torch_version=str(torch.__version__),
        **extra,
    )


def save_checkpoint(path: Path, **fields) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in fields]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    tmp = Path(path).with_suffix(".tmp")
    torch.save(fields, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint written by `segserve train`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold only tensors, numbers, strings, lists and dicts.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt file
        raise CheckpointError(
            f"{path} is not a readable segserve checkpoint ({exc.__class__.__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a segserve training checkpoint (it needs {', '.join(REQUIRED_KEYS)}; it has {have})"
        )
    if ckpt["architecture"] not in MODEL_NAMES:
        raise CheckpointError(f"{path}: unknown architecture {ckpt['architecture']!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    opts = {k: v for k, v in ckpt["model_options"].items() if k != "backbone_weights"}
    model = build_model(ckpt["architecture"], ckpt["num_classes"], **opts)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit {ckpt['architecture']}: {exc}") from exc
    return model
