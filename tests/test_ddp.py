"""DistributedDataParallel, run for real: two CPU processes on the gloo backend (what a
multi-GPU host runs with NCCL, through the same code), started by torchrun (`make test-slow`)
or, in `make test`, with the environment torchrun gives its workers: torchrun's own start-up
costs about 5 s of two cores before a worker starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import free_port
from segserve.training.checkpoint import load_checkpoint
from segserve.training.datasets import VOCSegmentation
from segserve.training.evaluate import evaluate_checkpoint


def run_two_workers(launcher: str, train_args: list[str], log_dir: Path) -> None:
    """`segserve train` in two processes of one process group, both finished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "segserve.cli",
            *train_args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    # What torchrun sets for each worker of a one-node group (the env:// rendezvous).
    group = {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    logs = [log_dir / f"rank{rank}.log" for rank in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "segserve.cli", *train_args],
            env={**env, **group, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=logs[rank].open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        for rank, worker in enumerate(workers):
            assert worker.wait(300) == 0, f"rank {rank}: {logs[rank].read_text()[-3000:]}"
    finally:  # one that failed leaves the other waiting for it
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


@pytest.mark.parametrize("launcher", [pytest.param("torchrun", marks=pytest.mark.slow), "env"])
def test_two_processes_train_one_model_and_score_every_val_image_once(
    launcher, synth_root, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    sets = data / "ImageSets" / "Segmentation"
    # An odd number of val images: a padding sampler would score one of them twice.
    val_ids = sets.joinpath("val.txt").read_text().split()
    val_ids += sets.joinpath("train.txt").read_text().split()[:1]
    assert len(val_ids) % 2 == 1
    sets.joinpath("val.txt").write_text("\n".join(val_ids) + "\n")

    out = tmp_path / "run"
    run_two_workers(
        launcher,
        [
            "train",
            "--data",
            str(data),
            "--model",
            "unet",
            "--width",
            "8",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--crop-size",
            "64",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
        ],
        tmp_path,
    )

    ckpt = load_checkpoint(out / "best.pt")
    labelled = sum(int((np.asarray(t) != 255).sum()) for _, t in VOCSegmentation(data, "val"))
    assert ckpt["metrics"]["pixels"] == labelled  # each val image counted exactly once
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    alone = evaluate_checkpoint(data, out / "best.pt", "val", "cpu", as_json=True)
    assert alone["mean_iu"] == pytest.approx(ckpt["metrics"]["mean_iu"], rel=1e-9)
    assert alone["pixel_accuracy"] == pytest.approx(ckpt["metrics"]["pixel_accuracy"], rel=1e-9)
