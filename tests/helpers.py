"""Test helpers: tiny checkpoints and a real `segserve serve` process on loopback."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path, architecture="unet", num_classes=4, **opts):
    import torch

    from segserve.models import build_model
    from segserve.training.checkpoint import IMAGENET_MEAN, IMAGENET_STD, save_checkpoint

    torch.manual_seed(0)
    model = build_model(architecture, num_classes, **opts).eval()
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    save_checkpoint(
        path, architecture=architecture, model_options=opts, num_classes=num_classes, class_names=names,
        palette=[[i * 20, 255 - i * 20, i * 5] for i in range(num_classes)], mean=IMAGENET_MEAN, std=IMAGENET_STD,
        size_divisor=16 if architecture == "unet" else 32, state_dict=model.state_dict(),
        metrics={"pixel_accuracy": 0.9, "mean_accuracy": 0.8, "mean_iu": 0.7, "fw_iu": 0.85}, trained_on="test",
    )  # fmt: skip
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def run_server(repository: Path, tmp_path: Path, wait_ready: bool = True, **settings):
    """`segserve serve` as its own process on a free loopback port, settings as env vars."""
    port = free_port()
    env = {**os.environ, "SEGSERVE_WARMUP_SHAPES": "64x64", "SEGSERVE_INTRA_OP_THREADS": "2"}
    env.update({f"SEGSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    log = tmp_path / f"server-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(repository), "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        path = "/readyz" if wait_ready else "/healthz"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()}")
            try:
                if httpx.get(server.url + path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up in 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def image_bytes(h: int, w: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()
