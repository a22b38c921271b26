"""Overlap-tile inference, measured (docs/benchmarks.md, "Overlap-tile inference"):

    python -m bench.tiles halo [--out docs/bench]   tiled vs whole-image labels by halo
    python -m bench.tiles size [--out docs/bench]   seconds per megapixel by tile size

`halo`: the share of pixels where tiled labels equal the whole image's, for the shipped
U-Net (onnxruntime) and an FCN-8s with random, Kaiming-scaled weights (PyTorch: its labels
vary, so agreement means something), on images of fresh samples that also run whole. The
halo each architecture needs for >= 99.9 % goes into contracts/architectures.py.

`size`: bare `session.run` over the tiles of a large image (the shipped model, segserve's
Engine, batches of one tile shape as large as the CPU batch-pixel bound allows), for tile
sides of 512-896 px with U-Net's halo: tiles, pixels computed per image pixel (halos and the
last tile's shift), seconds per megapixel of image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from segserve.contracts.architectures import tile_halo
from segserve.default_model import FILES
from segserve.service.media.tiling import keep_centre, plan_tiles, tile_pixels
from segserve.service.runtime.engine import Engine
from segserve.service.settings import ARENA_SHRINK_PIXELS
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, render_mosaic


def mosaic(height: int, width: int, seed: int) -> np.ndarray:
    config = SynthConfig(count=10**6, seed=seed, **DEFAULT_MODEL_SET)
    return render_mosaic(config, (height, width))[0]


def in_tiles(rgb: np.ndarray, tile: int, halo: int, divisor: int, run) -> tuple[np.ndarray, int]:
    labels = np.empty(rgb.shape[:2], np.uint8)
    grid = plan_tiles(rgb.shape[:2], tile, halo, divisor)
    for t in grid.tiles:
        keep_centre(labels, run(tile_pixels(rgb, t)), t)
    return labels, grid.count


def fcn8s_runner():
    """(H, W, 3) uint8 -> labels of an FCN-8s with random, Kaiming-scaled weights (seed 0):
    its labels vary, so tiled-vs-whole agreement measures its receptive field, not its
    accuracy. Shared with tests/test_tiling.py's slow FCN check."""
    import torch

    from segserve.models import build_model

    torch.manual_seed(0)
    net = build_model("fcn8s", 9).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                torch.nn.init.zeros_(m.bias)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def run(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            return net((x - mean) / std).argmax(1)[0].numpy().astype(np.uint8)

    return run


def halo_table() -> list[dict]:
    rows = []
    engine = Engine.load(FILES / "model.onnx", "cpu", 2)
    unet = mosaic(1100, 1300, seed=7)
    whole = engine.segment([unet])[0]
    for tile, halo in [
        (512, 48),
        (512, 64),
        (512, 80),
        (512, 96),
        (640, 48),
        (640, 64),
        (640, 80),
        (640, 96),
        (768, 64),
    ]:
        labels, count = in_tiles(unet, tile, halo, 16, lambda x: engine.segment([x])[0])
        rows.append(row("unet (shipped)", unet, tile, halo, count, labels, whole))
    fcn = fcn8s_runner()
    image = mosaic(1088, 1216, seed=5)
    whole = fcn(image)
    for tile, halo in [(768, 128), (768, 192), (768, 256)]:
        labels, count = in_tiles(image, tile, halo, 32, fcn)
        rows.append(row("fcn8s (random)", image, tile, halo, count, labels, whole))
    return rows


def row(model, image, tile, halo, count, labels, whole) -> dict:
    out = {
        "model": model,
        "image": list(image.shape[:2]),
        "tile": tile,
        "halo": halo,
        "tiles": count,
        "agreement": float((labels == whole).mean()),
    }
    print(json.dumps(out), flush=True)
    return out


def size_table(height: int, width: int) -> list[dict]:
    engine = Engine.load(FILES / "model.onnx", "cpu", 2)
    image = mosaic(height, width, seed=11)
    megapixels = height * width / 1e6
    halo = tile_halo("unet")
    engine.segment([image[:512, :512]])
    rows = []
    for tile in (512, 640, 704, 768, 832, 880):
        grid = plan_tiles(image.shape[:2], tile, halo, 16)
        per_batch = max(1, (ARENA_SHRINK_PIXELS - 1) // (tile * tile))
        shapes: dict[tuple[int, int], list] = {}
        for t in grid.tiles:
            shapes.setdefault(t.size, []).append(t)
        labels = np.empty(image.shape[:2], np.uint8)
        t0 = time.perf_counter()
        for tiles in shapes.values():
            for i in range(0, len(tiles), per_batch):
                chunk = tiles[i : i + per_batch]
                out = engine.run(
                    engine.stack([tile_pixels(image, t) for t in chunk]), [t.size for t in chunk]
                )
                for t, lab in zip(chunk, out, strict=True):
                    keep_centre(labels, lab, t)
        seconds = time.perf_counter() - t0
        result = {
            "tile": tile,
            "halo": halo,
            "batch": per_batch,
            "tiles": grid.count,
            "computed_per_pixel": grid.computed_pixels / (height * width),
            "seconds_per_megapixel": seconds / megapixels,
            "one_run_s": seconds / -(-grid.count // per_batch),
        }
        print(json.dumps(result), flush=True)
        rows.append(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("halo", "size"))
    parser.add_argument("--size", default="3000x4000", help="size: the image, HxW")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "halo":
        rows = halo_table()
    else:
        h, w = (int(v) for v in args.size.split("x"))
        rows = size_table(h, w)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"tiles_{args.what}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
