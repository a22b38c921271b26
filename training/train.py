"""Training: per-pixel cross-entropy, SGD+momentum or AdamW, poly LR, checkpoints each epoch.

Flat on purpose, in the manner of torchvision's references/segmentation. Launched with
torchrun it runs DistributedDataParallel, one process per GPU, through the same code.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segserve import models
from segserve.training.checkpoint import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from segserve.training.datasets import VOCSegmentation
from segserve.training.metrics import ConfusionMatrix, segmentation_scores
from segserve.training.transforms import EvalTransform, TrainTransform

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "pixel_accuracy",
    "mean_accuracy",
    "mean_iu",
    "fw_iu",
    "lr",
    "images_per_s",
    "epoch_s",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    # Each worker's Python/NumPy randomness follows torch's per-worker seed: repeatable runs.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def rng_state(loader_generator: torch.Generator) -> dict:
    """Every random stream a run draws from, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "loader": loader_generator.get_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); sets up the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), world


def build_network(args, num_classes: int) -> tuple[nn.Module, dict]:
    """The model and the options a checkpoint records to rebuild it."""
    if args.model == "unet":
        opts = {"width": args.width, "batch_norm": args.batch_norm}
        return models.build_model("unet", num_classes, **opts), opts
    if args.init_from is not None:
        coarse_ckpt = load_checkpoint(args.init_from)
        coarse = model_from_checkpoint(coarse_ckpt)
        if not isinstance(coarse, models.FCN) or coarse_ckpt["num_classes"] != num_classes:
            raise SystemExit(
                f"--init-from must be a coarser FCN checkpoint with {num_classes} classes"
            )
        return models.fcn_from_coarser(coarse, models.FCN_STRIDES[args.model]), {}
    model = models.build_model(args.model, num_classes, backbone_weights=args.backbone_weights)
    return model, {}


def poly_lambda(total_iters: int, power: float):
    return lambda it: (1 - min(it, total_iters - 1) / total_iters) ** power


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, num_classes: int, progress: bool = False
) -> dict:
    """Val loss and the four metrics; images run one at a time at their own size."""
    from tqdm import tqdm

    model.eval()
    cm = ConfusionMatrix(num_classes)
    criterion = nn.CrossEntropyLoss(ignore_index=255, reduction="sum")
    loss_sum, counted = 0.0, 0
    for image, target in tqdm(loader, desc="val", leave=False, disable=not progress):
        image, target = image.to(device), target.to(device)
        logits = model(image)
        loss_sum += float(criterion(logits.float(), target))
        counted += int((target != 255).sum())
        cm.update(logits.argmax(1).cpu(), target.cpu())
    matrix = torch.from_numpy(cm.matrix).to(device)
    stats = torch.tensor([loss_sum, counted], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(matrix)
        dist.all_reduce(stats)
    scores = segmentation_scores(matrix.cpu().numpy())
    scores["val_loss"] = float(stats[0] / max(stats[1], 1))
    scores["matrix"] = matrix.cpu().numpy()
    return scores


def train(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    seed_everything(args.seed + rank)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 1e-3)
    out: Path = args.out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_set = VOCSegmentation(
        args.data, "train", TrainTransform(args.crop_size, mean, std, scale=tuple(args.scale))
    )
    val_set = VOCSegmentation(args.data, "val", EvalTransform(mean, std))
    if args.max_train_images:
        train_set.ids = train_set.ids[: args.max_train_images]
    num_classes = train_set.num_classes

    model, model_options = build_network(args, num_classes)
    model.to(device)
    train_sampler = DistributedSampler(train_set, seed=args.seed) if world > 1 else None
    val_sampler = DistributedSampler(val_set, shuffle=False) if world > 1 else None
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
        num_workers=args.workers, drop_last=len(train_set) >= args.batch_size * world,
        worker_init_fn=seed_worker, generator=g, persistent_workers=args.workers > 0,
    )  # fmt: skip
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, num_workers=args.workers)

    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    total_iters = max(1, args.epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lambda(total_iters, args.poly_power)
    )
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(ignore_index=255)

    start_epoch, best_iu = 0, -math.inf
    if args.resume:
        last = out / "last.pt"
        if not last.is_file():
            raise SystemExit(f"--resume: no {last} to continue from")
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_iu = ckpt["epoch"] + 1, ckpt["best_mean_iu"]
        restore_rng_state(ckpt["rng"], g)

    net = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    config.update(
        lr=lr, num_classes=num_classes, class_names=train_set.class_names, world_size=world
    )
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    metrics_path = out / "metrics.csv"
    if rank == 0 and (not args.resume or not metrics_path.exists()):
        with metrics_path.open("w", newline="") as f:
            csv.writer(f).writerow(METRIC_COLUMNS)

    from tqdm import tqdm

    row: dict = {}
    last_epoch = (
        args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    )
    for epoch in range(start_epoch, last_epoch):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        net.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not (args.progress and rank == 0),
        )
        for image, target in bar:
            image, target = (
                image.to(device, non_blocking=True),
                target.to(device, non_blocking=True),
            )
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(net(image), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += image.shape[0]
            loss_sum += loss.item() * image.shape[0]
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        train_s = time.perf_counter() - t0
        scores = evaluate(
            model, val_loader, device, num_classes, progress=args.progress and rank == 0
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": scores["val_loss"],
            **{k: scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")},
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen * world / train_s,
            "epoch_s": time.perf_counter() - t0,
        }
        if rank != 0:
            continue
        with metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in METRIC_COLUMNS])
        val_metrics = {
            k: scores[k]
            for k in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu", "per_class_iu")
        }
        fields = dict(
            architecture=args.model, model_options=model_options, num_classes=num_classes,
            class_names=train_set.class_names, palette=train_set.palette, mean=mean, std=std,
            state_dict=model.state_dict(), metrics=val_metrics,
            epoch=epoch, trained_on=str(train_set.root), torch_version=str(torch.__version__),
        )  # fmt: skip
        is_best = scores["mean_iu"] > best_iu
        best_iu = max(best_iu, scores["mean_iu"])
        if is_best:
            save_checkpoint(out / "best.pt", **fields, best_mean_iu=best_iu)
        save_checkpoint(
            out / "last.pt", **fields, best_mean_iu=best_iu, optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
            rng=rng_state(g),
        )  # fmt: skip
        if args.progress:
            print(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
                f"mean IU {row['mean_iu']:.4f} pixel acc {row['pixel_accuracy']:.4f} "
                f"({row['images_per_s']:.1f} img/s){'  *best*' if is_best else ''}",
                flush=True,
            )
    if dist.is_initialized():
        dist.destroy_process_group()
    return row
