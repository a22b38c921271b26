"""DistributedDataParallel, run for real: torchrun with two CPU processes on the gloo backend
(what a multi-GPU host runs with NCCL, through the same code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from segserve.training.checkpoint import load_checkpoint
from segserve.training.datasets import VOCSegmentation
from segserve.training.evaluate import run_eval


def test_two_processes_train_one_model_and_score_every_val_image_once(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    sets = data / "ImageSets" / "Segmentation"
    # An odd number of val images: a padding sampler would score one of them twice.
    val_ids = sets.joinpath("val.txt").read_text().split()
    val_ids += sets.joinpath("train.txt").read_text().split()[:1]
    assert len(val_ids) % 2 == 1
    sets.joinpath("val.txt").write_text("\n".join(val_ids) + "\n")

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "segserve.cli", "train", "--data", str(data), "--model", "unet", "--width", "8",
        "--out", str(out), "--epochs", "1", "--batch-size", "2", "--crop-size", "64",
        "--workers", "0", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ckpt = load_checkpoint(out / "best.pt")
    labelled = sum(int((np.asarray(t) != 255).sum()) for _, t in VOCSegmentation(data, "val"))
    assert ckpt["metrics"]["pixels"] == labelled  # each val image counted exactly once
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    import json

    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    alone = run_eval(data, out / "best.pt", "val", "cpu", as_json=True)
    assert alone["mean_iu"] == pytest.approx(ckpt["metrics"]["mean_iu"], rel=1e-9)
    assert alone["pixel_accuracy"] == pytest.approx(ckpt["metrics"]["pixel_accuracy"], rel=1e-9)
