"""Training: per-pixel cross-entropy, SGD+momentum or AdamW, poly LR, checkpoints each epoch.

Flat on purpose, in the manner of torchvision's references/segmentation. A run is a
`TrainConfig`; `train(cfg)` runs it (the CLI builds the config from its flags, the default
model's bootstrap builds one directly). Launched with torchrun it runs
DistributedDataParallel, one process per device, through the same code.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segserve import models
from segserve.contracts.card import IMAGENET_MEAN, IMAGENET_STD, SCORES
from segserve.contracts.palette import IGNORE_LABEL
from segserve.training import provenance
from segserve.training.checkpoint import (
    checkpoint_fields,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from segserve.training.datasets import VOCSegmentation
from segserve.training.evaluate import (
    TrainingSetupError,
    evaluate,
    input_layout,
    resolve_device,
)
from segserve.training.recipes import defaults_for
from segserve.training.transforms import EvalTransform, TrainTransform

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    *SCORES,
    "lr",
    "images_per_s",
    "epoch_s",
]


@dataclass
class TrainConfig:
    """Everything one training run depends on; `segserve train --help` says each field."""

    data: Path
    model: str
    out: Path
    epochs: int = 30
    # None: the architecture's and stage's default (training/recipes.py), set on creation.
    batch_size: int | None = None
    crop_size: int | None = None
    scale: tuple[float, float] | None = None
    # Pixels of padding (mean colour, ignored by the loss) around each image before the crop,
    # so crops hold image borders as served images do; 0: crops from inside only.
    border_margin: int = 0
    optimizer: str | None = None
    lr: float | None = None  # None: the recipe's (0.001 for adamw where the recipe is sgd)
    momentum: float | None = None
    weight_decay: float | None = None
    poly_power: float | None = None
    loss: str | None = None  # "mean" over labelled pixels or "sum" (the authors' Caffe loss)
    class_weighting: str | None = None  # "none", "median" (median frequency balancing) or "sqrt"
    bias_lr_mult: float | None = None
    bias_decay: bool | None = None
    width: int = 64
    batch_norm: bool = False
    backbone_weights: str | None = None
    init_from: Path | None = None
    resume: bool = False
    stop_after: int | None = None
    device: str = "auto"
    # auto: float16 on CUDA, bfloat16 on CPUs that compute it natively, else float32;
    # float32 | bfloat16 | float16 force one (bfloat16 where it is emulated is slow, not wrong).
    precision: str = "auto"
    compile: bool = False  # torch.compile the training forward/backward (about 1.15x on CPU)
    workers: int = 2
    seed: int = 0
    max_train_images: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        if self.init_from is not None:
            self.init_from = Path(self.init_from)
        defaults = defaults_for(self.model, staged=self.init_from is not None)
        if self.lr is None and self.optimizer not in (None, defaults["optimizer"]):
            self.lr = 1e-3  # AdamW where the recipe is SGD: its usual rate, not SGD's
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.scale = tuple(self.scale)
        if self.loss not in ("mean", "sum"):
            raise ValueError(f"loss must be 'mean' or 'sum', not {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, "
                f"not {self.class_weighting!r}"
            )

    @classmethod
    def from_mapping(cls, values: dict) -> TrainConfig:
        """The fields of `values` this config knows (e.g. `vars(args)`); the rest ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


class EvalShard(torch.utils.data.Sampler[int]):
    """Rank r of w evaluates images r, r+w, r+2w, ...: each validation image exactly once
    across ranks. (DistributedSampler pads the set to a multiple of w, so some images would
    be counted twice in the summed confusion matrix: 1,449 VOC images on 8 ranks -> 1,456.)"""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# none; median frequency balancing; its square root, which keeps rare classes up without
# making the background (10x below the median on the shapes set) cheap to paint over.
CLASS_WEIGHTINGS = ("none", "median", "sqrt")


def median_frequency_weights(pixels: np.ndarray, present_in: np.ndarray) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus, ICCV 2015; SegNet): class c weighs
    median(f) / f_c, f_c = its pixels / pixels of the images it appears in. Rare classes
    (thin bars, small stars) then count as much as the background in the loss, which is
    what mean IU rewards. Classes never seen weigh 0."""
    freq = np.divide(pixels, present_in, out=np.zeros(len(pixels)), where=present_in > 0)
    seen = freq > 0
    weights = np.zeros(len(pixels))
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return weights


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


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); sets up the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), world


def build_network(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, dict]:
    """The model and the options a checkpoint records to rebuild it."""
    if cfg.model == "unet":
        opts = {"width": cfg.width, "batch_norm": cfg.batch_norm}
        return models.build_model("unet", num_classes, **opts), opts
    if cfg.init_from is not None:
        coarse_ckpt = load_checkpoint(cfg.init_from)
        coarse = model_from_checkpoint(coarse_ckpt)
        if not isinstance(coarse, models.FCN) or coarse_ckpt["num_classes"] != num_classes:
            raise TrainingSetupError(
                f"--init-from must be a coarser FCN checkpoint with {num_classes} classes"
            )
        return models.fcn_from_coarser(coarse, models.FCN_STRIDES[cfg.model]), {}
    if cfg.backbone_weights is None:
        raise TrainingSetupError(NO_BACKBONE)
    at_once = cfg.model != "fcn32s"  # FCN-16s/8s straight from the backbone: skips scaled
    model = models.build_model(
        cfg.model, num_classes, backbone_weights=cfg.backbone_weights, at_once=at_once
    )
    return model, {"at_once": at_once} if at_once else {}


NO_BACKBONE = """\
FCN trains from ImageNet VGG16 weights, as in the paper; without them (and without batch
norm) it does not train like the paper's nets. Pass one of:
  --backbone-weights imagenet   torchvision's VGG16_Weights.IMAGENET1K_V1: it downloads
                                vgg16-397923af.pth into $TORCH_HOME/hub/checkpoints
                                (~/.cache/torch/hub/checkpoints); offline, copy the file there
  --backbone-weights FILE       a VGG16 state dict (torchvision's layout, RGB input)
  --backbone-weights none       train from scratch, knowingly"""


def poly_lambda(total_iters: int, power: float):
    return lambda it: (1 - min(it, total_iters - 1) / total_iters) ** power


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Weights at the base rate with decay; biases at `bias_lr_mult` times the rate, with
    decay only if `bias_decay` (the authors' lr_mult 2, decay_mult 0)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    bias_decay = cfg.weight_decay if cfg.bias_decay else 0.0
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if biases:
        groups.append(
            {"params": biases, "lr": cfg.lr * cfg.bias_lr_mult, "weight_decay": bias_decay}
        )
    return groups


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX, through oneDNN)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The mixed-precision type a run computes in, or None for plain float32.

    auto: float16 on CUDA (with a grad scaler); on a CPU bfloat16 only where it is native
    (2-2.5x the float32 step on an AVX512-BF16 machine, docs/benchmarks.md): elsewhere
    it is emulated and slower than float32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if native_bf16() else None
    if precision == "float16" and device.type != "cuda":
        raise TrainingSetupError("--precision float16 needs a CUDA device; on a CPU use bfloat16")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def train_one_epoch(
    net: nn.Module,
    loader,
    criterion,
    optimizer,
    scheduler,
    scaler,
    device,
    amp_dtype: torch.dtype | None,
    desc: str,
    progress: bool,
) -> tuple[float, int]:
    """One pass over the training set; (mean loss per image, images seen)."""
    from tqdm import tqdm

    net.train()
    seen, loss_sum = 0, 0.0
    layout = input_layout(net)
    bar = tqdm(loader, desc=desc, disable=not progress)
    for image, target in bar:
        image = image.to(device, non_blocking=True).contiguous(memory_format=layout)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(net(image).float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += image.shape[0]
        loss_sum += loss.item() * image.shape[0]
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return loss_sum / max(seen, 1), seen


def train(cfg: TrainConfig) -> dict:
    """Run `cfg`; returns the last epoch's row of metrics.csv (empty if none ran)."""
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    seed_everything(cfg.seed + rank)
    if rank == 0:
        cfg.out.mkdir(parents=True, exist_ok=True)

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_set = VOCSegmentation(
        cfg.data,
        "train",
        TrainTransform(cfg.crop_size, mean, std, scale=cfg.scale, margin=cfg.border_margin),
    )
    val_set = VOCSegmentation(cfg.data, "val", EvalTransform(mean, std))
    if cfg.max_train_images:
        train_set.ids = train_set.ids[: cfg.max_train_images]
    num_classes = train_set.num_classes

    model, model_options = build_network(cfg, num_classes)
    model.to(device)
    train_sampler = DistributedSampler(train_set, seed=cfg.seed) if world > 1 else None
    val_sampler = EvalShard(len(val_set), rank, world) if world > 1 else None
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=cfg.workers,
        drop_last=len(train_set) >= cfg.batch_size * world,
        worker_init_fn=seed_worker,
        generator=g,
        persistent_workers=cfg.workers > 0,
    )
    val_loader = DataLoader(val_set, batch_size=1, sampler=val_sampler, num_workers=cfg.workers)

    optimizer = make_optimizer(cfg, model)
    total_iters = max(1, cfg.epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lambda(total_iters, cfg.poly_power)
    )
    amp_dtype = autocast_dtype(device, cfg.precision)
    if amp_dtype is not None:  # NHWC: what oneDNN / tensor cores convolve fastest
        model.to(memory_format=torch.channels_last)
    # bf16 keeps float32's exponent range, so only float16 needs loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    weights = None
    if cfg.class_weighting != "none":
        weights = torch.as_tensor(median_frequency_weights(*train_set.class_pixels()))
        if cfg.class_weighting == "sqrt":
            weights = weights.sqrt()
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else weights.float().to(device),
        ignore_index=IGNORE_LABEL,
        reduction=cfg.loss,
    )

    start_epoch, best_iu = 0, -math.inf
    if cfg.resume:
        last = cfg.out / "last.pt"
        if not last.is_file():
            raise TrainingSetupError(f"--resume: no {last} to continue from")
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_iu = ckpt["epoch"] + 1, ckpt["best_mean_iu"]
        restore_rng_state(ckpt["rng"], g)

    ddp_devices = [device] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices) if world > 1 else model
    if cfg.compile:  # training steps only: validation runs whole images of many sizes
        net = torch.compile(net)
    config = {
        **cfg.as_json(),
        "lr": cfg.lr,
        "num_classes": num_classes,
        "class_names": train_set.class_names,
        "world_size": world,
    }
    metrics_path = cfg.out / "metrics.csv"
    if rank == 0:
        (cfg.out / "config.json").write_text(json.dumps(config, indent=2))
        if not cfg.resume or not metrics_path.exists():
            with metrics_path.open("w", newline="") as f:
                csv.writer(f).writerow(METRIC_COLUMNS)

    row: dict = {}
    progress = cfg.progress and rank == 0
    origin = provenance.record(device, amp_dtype, world, cfg.as_json(), train_set.root)
    last_epoch = (
        cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    )
    for epoch in range(start_epoch, last_epoch):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_loss, seen = train_one_epoch(
            net,
            train_loader,
            criterion,
            optimizer,
            scheduler,
            scaler,
            device,
            amp_dtype,
            f"epoch {epoch + 1}/{cfg.epochs}",
            progress,
        )
        train_s = time.perf_counter() - t0
        scores = evaluate(model, val_loader, device, num_classes, progress=progress)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": scores["val_loss"],
            **{k: scores[k] for k in SCORES},
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen * world / train_s,
            "epoch_s": time.perf_counter() - t0,
        }
        if rank != 0:
            continue
        with metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in METRIC_COLUMNS])
        val_metrics = {k: scores[k] for k in (*SCORES, "per_class_iu", "pixels", "images")}
        # The summed confusion matrix (rows = truth): its row sums are the labelled pixels
        # of each class, whatever kernels computed the predictions.
        val_metrics["matrix"] = scores["matrix"].tolist()
        with metrics_path.open() as f:  # every epoch so far, over every invocation
            train_seconds = sum(float(r["epoch_s"]) for r in csv.DictReader(f))
        fields_ = checkpoint_fields(
            model,
            cfg.model,
            model_options,
            train_set.class_names,
            train_set.palette,
            metrics=val_metrics,
            trained_on=str(train_set.root),
            mean=mean,
            std=std,
            epoch=epoch,
            provenance={**origin, "train_seconds": round(train_seconds, 1)},
        )
        is_best = scores["mean_iu"] > best_iu
        best_iu = max(best_iu, scores["mean_iu"])
        if is_best:
            save_checkpoint(cfg.out / "best.pt", **fields_, best_mean_iu=best_iu)
        save_checkpoint(
            cfg.out / "last.pt",
            **fields_,
            best_mean_iu=best_iu,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            rng=rng_state(g),
        )
        if cfg.progress:
            print(
                f"epoch {epoch + 1}: loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
                f"mean IU {row['mean_iu']:.4f} pixel acc {row['pixel_accuracy']:.4f} "
                f"({row['images_per_s']:.1f} img/s){'  *best*' if is_best else ''}",
                flush=True,
            )
    if dist.is_initialized():
        dist.destroy_process_group()
    return row
