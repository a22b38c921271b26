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
import torch
from torch.utils.data import DataLoader

from helpers import free_port
from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint
from segserve.training.datasets import VOCSegmentation
from segserve.training.evaluate import evaluate
from segserve.training.transforms import EvalTransform


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
    metrics = ckpt["metrics"]
    val = VOCSegmentation(data, "val")
    num_classes = ckpt["num_classes"]
    truth = sum(labelled_per_class(np.asarray(t), num_classes) for _, t in val)
    matrix = np.asarray(metrics["matrix"])
    # What DDP must guarantee, exactly, on any CPU: every val image scored once across the
    # ranks. A confusion matrix's rows are the truth (each class's labelled pixels, whatever
    # the network predicted): an image scored twice or skipped changes them.
    assert metrics["images"] == len(val_ids)
    assert np.array_equal(matrix.sum(axis=1), truth)
    assert metrics["pixels"] == truth.sum()
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    # The same checkpoint scored alone, on other kernels on purpose (channels-last, two
    # threads; the workers ran one thread each): an untrained net's logits are near ties,
    # and which side of a tie a pixel falls on is the kernel's, not DDP's. The predictions
    # agree on all but a few pixels, and so do the scores.
    alone = evaluate_elsewhere(data, out / "best.pt")
    assert np.array_equal(alone["matrix"].sum(axis=1), truth)
    moved = int(np.abs(alone["matrix"] - matrix).sum()) // 2  # a pixel moves between 2 cells
    assert moved <= 0.001 * truth.sum(), (moved, truth.sum())
    assert abs(alone["mean_iu"] - metrics["mean_iu"]) <= 1e-3
    assert abs(alone["pixel_accuracy"] - metrics["pixel_accuracy"]) <= 1e-3


def labelled_per_class(target: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(target[target != 255].ravel(), minlength=num_classes)


def evaluate_elsewhere(data: Path, checkpoint: Path) -> dict:
    """`evaluate` on a split with the network in channels-last memory and two threads."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).to(memory_format=torch.channels_last)
    val = VOCSegmentation(data, "val", EvalTransform(ckpt["mean"], ckpt["std"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            return evaluate(model, DataLoader(val), torch.device("cpu"), ckpt["num_classes"])
    finally:
        torch.set_num_threads(threads)
