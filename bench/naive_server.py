"""The baseline a user would write in an afternoon: FastAPI around the PyTorch model, eager,
one request at a time (the model runs on the event loop, so requests queue behind it).
Kept for the comparison in bench/compare.py; not shipped in service/.

    NAIVE_CHECKPOINT=runs/unet-shapes/best.pt python -m uvicorn bench.naive_server:app
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint

checkpoint = load_checkpoint(os.environ["NAIVE_CHECKPOINT"])
model = model_from_checkpoint(checkpoint).eval()
mean = torch.tensor(checkpoint["mean"]).view(3, 1, 1)
std = torch.tensor(checkpoint["std"]).view(3, 1, 1)
palette = [v for rgb in checkpoint["palette"] for v in rgb]
app = FastAPI()


@app.post("/segment")
async def segment(request: Request) -> Response:
    image = Image.open(io.BytesIO(await request.body())).convert("RGB")
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255)
    with torch.inference_mode():
        labels = model(((x - mean) / std)[None]).argmax(1)[0].to(torch.uint8).numpy()
    out = Image.fromarray(labels, "P")
    out.putpalette(palette)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@app.get("/metrics")
async def metrics() -> Response:
    return Response("", media_type="text/plain")  # nothing to report; bench reads it anyway
