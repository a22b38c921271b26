"""What a variant costs on top of the one torch -> ONNX conversion (docs/benchmarks.md):
the conversion of a U-Net width 16 with 21 classes, then each of export/graph.py's ends.

    python -m bench.export_variants
"""

from __future__ import annotations

import time

import torch

from segserve.contracts.card import IMAGENET_MEAN, IMAGENET_STD
from segserve.export import graph
from segserve.export.onnx_export import convert_network, fold_batch_norm
from segserve.models import build_model


def main() -> None:
    torch.manual_seed(0)
    net = build_model("unet", 21, width=16, batch_norm=True).eval()
    t0 = time.perf_counter()
    network = convert_network(fold_batch_norm(net))
    print(f"conversion (the first in this process): {time.perf_counter() - t0:.1f} s")
    variants = {
        "pixel input": lambda: graph.with_pixel_input(network, IMAGENET_MEAN, IMAGENET_STD),
        "pixel input + label output": lambda: graph.with_label_output(
            graph.with_pixel_input(network, IMAGENET_MEAN, IMAGENET_STD)
        ),
        "float16": lambda: graph.to_float16(network),
    }
    for name, build in variants.items():
        t0 = time.perf_counter()
        build()
        print(f"{name}: {1000 * (time.perf_counter() - t0):.1f} ms")


if __name__ == "__main__":
    main()
