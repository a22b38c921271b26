"""`segserve batch` survives what a job on a cluster meets (make test-batch; not in make
test): its driver SIGKILLed mid-job, then the same command run again; a worker node removed
mid-job. Each run ends with every input exactly once: one output that decodes to the
input's size, one manifest row, no temporary file. Real Ray clusters on this machine
(ray.cluster_utils.Cluster: several raylets, as `ray start` twice makes them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import ROOT, wait_for
from segserve.default_model import NAME, install
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, render_sample

pytestmark = pytest.mark.batch

IMAGES = 160
REPORT = ROOT / ".bench" / "batch-cluster-report.json"


def report(**entries) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    REPORT.write_text(json.dumps({**data, **entries}, indent=2))


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """IMAGES samples in two folders, and the shipped model."""
    root = tmp_path_factory.mktemp("cluster-inputs")
    config = SynthConfig(count=10**6, seed=31, **DEFAULT_MODEL_SET)
    for i in range(IMAGES):
        folder = root / f"part{i % 2}"
        folder.mkdir(exist_ok=True)
        render_sample(config, i)[0].save(folder / f"x{i:04d}.jpg", quality=92)
    repo = tmp_path_factory.mktemp("cluster-repo")
    install(repo)
    return root, repo / NAME / "1" / "model.onnx"


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        yield made
    finally:
        made.shutdown()


def batch_command(inputs: Path, model: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "segserve.cli", "batch", str(inputs), "--model", str(model),
            "--out", str(out), "--engine", "ray", "--ray-address", address, "--no-progress",
            "--batch-size", "4"]  # fmt: skip


def every_input_exactly_once(inputs: Path, out: Path) -> None:
    expected = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.jpg"))
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == expected  # one row each, none twice
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"][:3]
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert outputs == sorted(str(Path(e).with_suffix(".png")) for e in expected)
    for rel in expected:
        with Image.open(out / Path(rel).with_suffix(".png")) as label:
            label.load()  # a whole PNG, not half of one
            assert label.size == Image.open(inputs / rel).size
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries, no parts


def test_a_driver_killed_mid_job_then_run_again_leaves_every_input_exactly_once(
    job_inputs, cluster, tmp_path
):
    inputs, model = job_inputs
    cluster.add_node(num_cpus=1)
    out = tmp_path / "out"
    command = batch_command(inputs, model, out, cluster.address)
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: len(list(out.rglob("*.png"))) >= IMAGES // 4,
            240,
            "a quarter done",
            interval=0.5,
        )
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the driver, in the middle of writing outputs
        first.wait()
    made = len(list(out.rglob("*.png")))
    assert 0 < made < IMAGES and not (out / "manifest.parquet").exists()
    time.sleep(2)  # Ray ends a dead driver's actors
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    skipped = int(re.search(r"(\d+) already done", again.stdout)[1])
    assert 0 < skipped <= made  # what the first run finished and recorded was not redone
    every_input_exactly_once(inputs, out)
    report(driver_killed={"inputs": IMAGES, "outputs_at_kill": made, "skipped_on_rerun": skipped,
                          "rerun": re.search(r"\d+ images in .*", again.stdout)[0]})  # fmt: skip


def test_a_worker_node_removed_mid_job_and_the_job_still_finishes_every_input_once(
    job_inputs, cluster, tmp_path
):
    inputs, model = job_inputs
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    job = subprocess.Popen(
        batch_command(inputs, model, out, cluster.address), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(
        lambda: len(list(out.rglob("*.png"))) >= IMAGES // 4, 240, "a quarter done", interval=0.5
    )
    made = len(list(out.rglob("*.png")))
    cluster.remove_node(worker)  # its raylet and the actor on it, gone
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stdout + stderr[-3000:]
    every_input_exactly_once(inputs, out)
    workers = {r["worker"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert len(workers) >= 2  # both nodes' actors made some of it
    report(node_removed={"inputs": IMAGES, "outputs_at_removal": made, "workers": sorted(workers),
                         "job": re.search(r"\d+ images in .*", stdout)[0]})  # fmt: skip
