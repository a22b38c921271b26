"""Training step speed on this machine: float32 against mixed precision (the autocast type
`segserve train --precision auto` picks here), NCHW against channels-last, for one architecture, batch
and crop. Training's own step (forward, backward, AdamW) on random data; images per second.

    python -m bench.train_step --width 16 --batch 8 16 --crop 96
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from segserve.models import build_model
from segserve.training.train import autocast_dtype, train_one_epoch


def images_per_s(
    width: int, batch: int, crop: int, dtype: torch.dtype | None, channels_last: bool, steps: int
) -> float:
    """Steps of training's own `train_one_epoch` over one random batch, repeated."""
    torch.manual_seed(0)
    net = build_model("unet", 9, width=width, batch_norm=True)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    batches = [(torch.randn(batch, 3, crop, crop), torch.randint(0, 9, (batch, crop, crop)))]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 and float32 need no scaling

    def run(n: int) -> None:
        train_one_epoch(
            net,
            batches * n,
            nn.CrossEntropyLoss(),
            optimizer,
            scheduler,
            scaler,
            torch.device("cpu"),
            dtype,
            "",
            progress=False,
        )

    run(3)  # oneDNN picks and caches its kernels on the first calls
    start = time.perf_counter()
    run(steps)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    mixed = autocast_dtype(torch.device("cpu"), "auto")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, --precision auto on CPU: {mixed}"
    )
    print("| batch | precision | layout | images/s |\n| --: | --- | --- | --: |")
    for batch, dtype, channels_last in itertools.product(
        args.batch, [None] + ([mixed] if mixed else []), [False, True]
    ):
        rate = images_per_s(args.width, batch, args.crop, dtype, channels_last, args.steps)
        name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        layout = "channels-last" if channels_last else "NCHW"
        print(f"| {batch} | {name} | {layout} | {rate:.1f} |")


if __name__ == "__main__":
    main()
