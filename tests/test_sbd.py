"""SBD read from its own folder (real .mat files, written here with scipy in SBD's format) and
the paper's split: SBD train minus VOC val for training, VOC val minus SBD train for val."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from segserve.contracts.palette import pil_palette, voc_palette
from segserve.training.datasets import VOCSegmentation
from segserve.training.sbd import SBDError, paper_split, read_sbd_label, write_paper_split


def write_sbd_mat(path, label: np.ndarray) -> None:
    """As SBD ships them: a struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    present = np.unique(label[label > 0]).astype(np.uint8)
    boundaries = np.empty((20, 1), object)  # a cell array of sparse maps in SBD; empty here
    for k in range(20):
        boundaries[k, 0] = np.zeros((0, 0))
    savemat(
        path,
        {"GTcls": {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}},
    )


def label_of(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    label[4:20, 6:26] = rng.integers(1, 21)
    return label


@pytest.fixture
def folders(tmp_path):
    sbd, voc = tmp_path / "benchmark_RELEASE" / "dataset", tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("cls", "img"):
        (sbd / sub).mkdir(parents=True)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    sbd_train = ["2008_000001", "2008_000002", "2008_000003", "2008_000004"]
    sbd_val = ["2008_000005"]
    voc_val = ["2008_000002", "2008_000006", "2008_000007"]  # 2008_000002 is in both
    for k, image_id in enumerate(sbd_train + sbd_val):
        write_sbd_mat(sbd / "cls" / f"{image_id}.mat", label_of(k))
        Image.new("RGB", (32, 24), (k, 0, 0)).save(sbd / "img" / f"{image_id}.jpg")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    for k, image_id in enumerate(voc_val):
        Image.new("RGB", (32, 24), (0, k, 0)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        target = Image.fromarray(np.where(label_of(10 + k) > 0, 255, 0).astype(np.uint8), "P")
        target.putpalette(pil_palette(voc_palette(256)))  # as VOC's PNGs carry
        target.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(voc_val) + "\n")
    return sbd, voc, tmp_path / "out"


def test_an_sbd_mat_file_reads_as_its_class_map(tmp_path):
    label = label_of(3)
    write_sbd_mat(tmp_path / "x.mat", label)
    assert np.array_equal(read_sbd_label(tmp_path / "x.mat"), label)
    savemat(tmp_path / "other.mat", {"something": np.zeros(3)})
    with pytest.raises(SBDError, match="not an SBD cls file"):
        read_sbd_label(tmp_path / "other.mat")


def test_the_split_keeps_voc_val_images_out_of_training():
    train, val = paper_split(["a", "b", "c"], ["b", "d"])
    assert train == ["a", "c"] and val == ["d"]


def test_the_paper_split_is_written_in_voc_layout(folders):
    sbd, voc, out = folders
    summary = write_paper_split(sbd.parent, voc.parent.parent, out)  # the folders above work too
    assert summary["train (sbd train - voc val)"] == 3 and summary["val (voc val - sbd train)"] == 2
    train = VOCSegmentation(out, "train")
    val = VOCSegmentation(out, "val")
    assert train.ids == ["2008_000001", "2008_000003", "2008_000004"]
    assert val.ids == ["2008_000006", "2008_000007"]
    assert not set(train.ids) & set(val.ids)
    _, target = train[1]
    assert np.array_equal(np.asarray(target), label_of(2))  # 2008_000003's .mat, as a PNG
    _, target = val[0]
    assert set(np.unique(np.asarray(target))) == {0, 255}  # VOC's own PNG, ignore band kept


def test_the_cli_writes_the_split_and_says_what_is_missing(folders, tmp_path):
    sbd, voc, out = folders
    cli = [sys.executable, "-m", "segserve.cli", "data", "sbd"]
    ok = subprocess.run(
        [*cli, "--sbd", str(sbd), "--voc", str(voc), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "train (sbd train - voc val)" in ok.stdout
    bad = subprocess.run(
        [*cli, "--sbd", str(tmp_path), "--voc", str(voc), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "not SBD's dataset/ folder" in bad.stderr
