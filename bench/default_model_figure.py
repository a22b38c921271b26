"""The default model's figures for docs/benchmarks.md and the README: its per-class IU on the
val split (a Markdown table) and a picture of a few val images, their ground truth and the
served model's labels.

    python -m bench.default_model_figure --data data/synth --checkpoint runs/unet-shapes/best.pt \
        --model model_repository/unet-shapes/1/model.onnx --out docs/images/default-model.png

The prediction comes from the exported ONNX model through segserve's own Engine (what the
server answers), the IU from the training checkpoint's evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segserve.service.runtime.engine import Engine
from segserve.training.checkpoint import load_checkpoint
from segserve.training.datasets import VOCSegmentation

TILE = 224


def tile(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((TILE, TILE), Image.NEAREST)
    canvas = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    canvas.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the exported model.onnx")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=4)
    args = p.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    names, ious = ckpt["class_names"], ckpt["metrics"]["per_class_iu"]
    print("| class | IU |\n| --- | --: |")
    for name, iu in zip(names, ious, strict=True):
        print(f"| {name} | {iu:.3f} |")
    print(f"| **mean** | **{ckpt['metrics']['mean_iu']:.3f}** |")

    engine = Engine.load(args.model, "cpu", 2)
    val = VOCSegmentation(args.data, "val")
    palette = np.array(ckpt["palette"] + [[255, 255, 255]] * (256 - len(ckpt["palette"])), np.uint8)
    rows = []
    for index in range(args.count):
        image, target = val.load(index)
        rgb = np.asarray(image)
        (labels,) = engine.segment([rgb])
        truth = palette[np.asarray(target)]  # ignore band in white
        rows.append(
            [tile(image), tile(Image.fromarray(truth)), tile(Image.fromarray(palette[labels]))]
        )
    header = 24
    sheet = Image.new("RGB", (3 * TILE, header + len(rows) * TILE), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("val image", "ground truth", "served model's labels")):
        draw.text((col * TILE + 8, 6), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * TILE, header + r * TILE))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
