"""Rebuilding the default model, `unet-shapes`, from scratch: synthetic data, the recipe the
shipped model was trained with, export. `make run` never trains (it installs the shipped
file, segserve/default_model); this is how that file is made again, or checked.

Before anything runs it says what the training will cost here: the arithmetic this machine
trains in (bfloat16 where the CPU computes it natively, else float32; float16 on CUDA) and
the minutes, from a short timed step of the recipe's own shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segserve.default_model import NAME
from segserve.models import build_model
from segserve.training.evaluate import resolve_device
from segserve.training.provenance import arithmetic, device_name
from segserve.training.synth import DEFAULT_MODEL_SET, SYNTH_CLASSES, SynthConfig, write_dataset
from segserve.training.train import TrainConfig, autocast_dtype, train, train_one_epoch

# The recipe of the shipped model (its card's provenance has the command that ran it):
# TrainConfig fields. Crops of 128 px with 32 px of mean-colour margin hold image borders
# as served images do; sqrt median-frequency weights lift thin classes without making the
# background cheap to paint over (docs/benchmarks.md, "Training the default model").
RECIPE = dict(
    model="unet",
    width=16,
    batch_norm=True,
    optimizer="adamw",
    lr=0.003,
    weight_decay=1e-4,
    epochs=60,
    batch_size=16,
    crop_size=128,
    scale=(0.75, 1.25),
    border_margin=32,
    class_weighting="sqrt",
    compile=True,
    workers=1,
)
# The data: synth.DEFAULT_MODEL_SET images, seed 0 (2,400 train, 600 val).
SYNTH = SynthConfig(count=3000, seed=0, **DEFAULT_MODEL_SET)


@dataclass
class Estimate:
    device: str
    arithmetic: str
    train_images_per_s: float
    val_images_per_s: float
    minutes: float

    def __str__(self) -> str:
        return (
            f"{self.device}, {self.arithmetic}: {self.train_images_per_s:.1f} training "
            f"images/s, {self.val_images_per_s:.1f} val images/s -> about "
            f"{self.minutes:.0f} minutes for {RECIPE['epochs']} epochs"
        )


def estimate(device: torch.device, steps: int = 3) -> Estimate:
    """Minutes the recipe will take here, from `steps` timed training steps of its batch and
    crop and a few val-sized forward passes (after one of each unmeasured: first calls pick
    kernels). torch.compile is left out of the timing: the run itself is about 1.15x faster."""
    torch.manual_seed(0)
    net = build_model("unet", len(SYNTH_CLASSES), width=RECIPE["width"], batch_norm=True).to(device)
    amp = autocast_dtype(device)
    if amp is not None:
        net.to(memory_format=torch.channels_last)
    b, c = RECIPE["batch_size"], RECIPE["crop_size"]
    batch = (torch.randn(b, 3, c, c), torch.randint(0, len(SYNTH_CLASSES), (b, c, c)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        train_one_epoch(
            net,
            [batch] * n,
            nn.CrossEntropyLoss(),
            optimizer,
            scheduler,
            scaler,
            device,
            amp,
            "",
            progress=False,
        )
        return time.perf_counter() - t0

    run(1)
    train_rate = b * steps / run(steps)
    side = (SYNTH.min_size + SYNTH.max_size) // 2
    image = torch.randn(1, 3, side, side, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        net.eval()(image)
        t0 = time.perf_counter()
        for _ in range(steps):
            net(image)
        val_rate = steps / (time.perf_counter() - t0)
    val = round(SYNTH.count * SYNTH.val_fraction)
    seconds = RECIPE["epochs"] * ((SYNTH.count - val) / train_rate + val / val_rate)
    return Estimate(device_name(device), arithmetic(amp), train_rate, val_rate, seconds / 60)


def bootstrap(repository: Path, work: Path, estimate_only: bool = False) -> Path | None:
    """Data, training and export of `unet-shapes` into `repository` (its next version);
    returns the version folder. An interrupted run in `work` resumes where it stopped."""
    from segserve.export.onnx_export import export_checkpoint

    cost = estimate(resolve_device("auto"))
    print(f"rebuilding {NAME} here: {cost}", flush=True)
    if estimate_only:
        return None
    data, run = Path(work) / "data" / "synth", Path(work) / "runs" / NAME
    if not (data / "classes.json").exists():
        print(f"[1/3] synthetic data set -> {data}")
        write_dataset(data, SYNTH)
    if not _finished(run):
        print(f"[2/3] training -> {run}")
        train(TrainConfig(data=data, out=run, resume=(run / "last.pt").exists(), **RECIPE))
    print(f"[3/3] exporting -> {repository / NAME}")
    # With its int8 variant, calibrated on the training images and gated on the val ones.
    result = export_checkpoint(run / "best.pt", repository, NAME, int8=True, int8_data=data)
    print(f"{NAME} rebuilt: {result.path} (val mean IU {result.card.metrics['mean_iu']:.4f})")
    return result.path.parent


def _finished(run: Path) -> bool:
    metrics = run / "metrics.csv"
    if not (run / "best.pt").exists() or not metrics.exists():
        return False
    return len(metrics.read_text().strip().splitlines()) - 1 >= RECIPE["epochs"]
