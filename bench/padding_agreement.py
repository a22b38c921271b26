"""How much padding in a merged batch changes a model's labels: images of different sizes
run in padded batches of `--batch` through the engine, against each image run alone.

The batcher merges different sizes only when its cost model says it pays (on a GPU, often;
on a CPU, almost never); this is the price of that merge in agreement.

    python -m bench.padding_agreement --repository model_repository --model unet-shapes \\
        --images data/synth/JPEGImages --limit 80
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from segserve.contracts.repository import walk
from segserve.service.media.imaging import decode_image
from segserve.service.runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="unet-shapes")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--limit", type=int, default=80)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    entry = [e for e in walk(args.repository) if e.name == args.model][-1]
    engine = Engine.load(entry.model_path, "cpu", os.cpu_count() or 1)
    images = [
        decode_image(f.read_bytes(), 10**9) for f in sorted(args.images.glob("*.jpg"))[: args.limit]
    ]
    agree = total = padded = 0
    for start in range(0, len(images), args.batch):
        group = images[start : start + args.batch]
        items = [engine.prepare(im) for im in group]
        batch = engine.stack(items)
        merged = engine.run(batch, [im.shape[:2] for im in group])
        padded += batch.shape[0] * int(np.prod(engine.item_size(batch[0]))) - sum(
            im.shape[0] * im.shape[1] for im in group
        )
        for im, lab in zip(group, merged, strict=True):
            (alone,) = engine.segment([im])
            agree += int((lab == alone).sum())
            total += lab.size
    print(
        f"{len(images)} images in padded batches of {args.batch}: agreement {agree / total:.4%} "
        f"of {total} pixels; padding {padded / (padded + total):.1%} of the pixels computed"
    )


if __name__ == "__main__":
    main()
