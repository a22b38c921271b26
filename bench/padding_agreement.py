"""Labels from segserve's batches (padded to shared shapes) against lone unpadded runs of
the same model, over a folder of images sent concurrently. Prints the pixel agreement.

    python -m bench.padding_agreement --repository model_repository --model unet-shapes \\
        --images data/synth/JPEGImages --limit 80
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.compare import start
from segserve.contracts.repository import versions_of
from segserve.service.engine import Engine
from segserve.service.imaging import decode_image, preprocess


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="unet-shapes")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--limit", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    files = sorted(args.images.glob("*.jpg"))[: args.limit]
    versions = versions_of(args.repository, args.model)
    engine = Engine.load(
        args.repository / args.model / str(versions[-1]) / "model.onnx", "cpu", os.cpu_count() or 1
    )
    card = engine.card
    port = 19000 + os.getpid() % 1000
    env = {
        "SEGSERVE_REPOSITORY": str(args.repository),
        "SEGSERVE_DEFAULT_MODEL": args.model,
        "SEGSERVE_MAX_QUEUE_DELAY_MS": "20",
    }
    proc = start(
        [sys.executable, "-m", "segserve.cli", "serve", "--port", str(port)],
        port,
        env,
        Path("/tmp/padding_agreement.log"),
    )
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client,
            ThreadPoolExecutor(args.concurrency) as pool,
        ):
            responses = list(
                pool.map(
                    lambda f: client.post(
                        "/segment", content=f.read_bytes(), headers={"Content-Type": "image/jpeg"}
                    ),
                    files,
                )
            )
            batches = client.get("/metrics").text
    finally:
        proc.terminate()
        proc.wait(60)
    agree = total = 0
    for f, r in zip(files, responses, strict=True):
        served = np.asarray(Image.open(io.BytesIO(r.content)))
        rgb = decode_image(f.read_bytes(), 10**9)
        alone = engine.run(preprocess([rgb], card.mean, card.std, card.input_dtype))[0]
        agree += int((served == alone).sum())
        total += served.size
    mean_batch = [
        line
        for line in batches.splitlines()
        if line.startswith("segserve_batch_size_sum")
        or line.startswith("segserve_batch_size_count")
    ]
    print(
        f"{len(files)} images, agreement {agree / total:.6%} of {total} pixels; {'; '.join(mean_batch)}"
    )


if __name__ == "__main__":
    main()
