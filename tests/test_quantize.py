"""INT8 variants (export/quantize.py): calibrated on the images named, published beside
model.onnx only when they agree with float32 on held-out images, refused with the figures
otherwise. The gate is checked on the shipped U-Net (the one trained network at hand; an
untrained one says one class everywhere, or flips near-ties at random) with 10 calibration
and 12 held-out images, a few seconds; the CLI and the plumbing on the tiny model."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from segserve.cli import main as cli
from segserve.contracts.card import read_card
from segserve.contracts.repository import CARD_FILE, file_sha256, variant_paths
from segserve.default_model import NAME, install
from segserve.export.quantize import (
    MIN_AGREEMENT,
    QuantizationError,
    QuantizationRefused,
    image_set,
    quantize_version,
)
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, write_dataset

SMALL = {"calibration": 10, "held_out": 12, "log": lambda *_: None}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """Fresh images of the default model's distribution, VOC layout (train and val)."""
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, SynthConfig(count=60, seed=777, **DEFAULT_MODEL_SET), progress=False)
    return root


@pytest.fixture
def shipped(tmp_path):
    repo = tmp_path / "repo"
    folder = install(repo)
    for path in variant_paths(folder).values():  # the shipped int8 goes: we make our own
        path.unlink()
    return repo


def card_of(path):
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return read_card(meta.custom_metadata_map, path.with_name(CARD_FILE))


def test_an_int8_variant_that_agrees_with_float32_is_published_with_its_gate_figures(
    shipped, shapes_data
):
    result = quantize_version(shipped, NAME, None, shapes_data, **SMALL)
    folder = shipped / NAME / "1"
    assert variant_paths(folder) == {"int8": folder / "model.int8.onnx"} == {"int8": result.path}
    card = card_of(result.path)
    q = card.quantization
    assert card.precision == "int8" and q["passed"] and q["agreement"] >= MIN_AGREEMENT
    assert q["calibration"]["images"] == 10 and q["held_out"]["images"] == 12
    assert abs(q["mean_iu"]["int8"] - q["mean_iu"]["float32"]) <= 0.005
    assert len(q["per_class_iu"]["int8"]) == card.num_classes
    assert card.source_sha256 == file_sha256(folder / "model.onnx")  # made from this file
    # model.onnx and its card are untouched: the variant is the same version, not a new one
    assert card_of(folder / "model.onnx").precision == "float32"
    assert json.loads((folder / CARD_FILE).read_text())["precision"] == "float32"
    assert result.file_bytes < (folder / "model.onnx").stat().st_size / 3


def test_calibrated_on_blank_images_the_variant_is_refused_with_its_figures_and_nothing_written(
    shipped, shapes_data, tmp_path
):
    blank = tmp_path / "blank"
    shutil.copytree(shapes_data, blank)
    for image_id in (blank / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        path = blank / "JPEGImages" / f"{image_id}.jpg"
        with Image.open(path) as im:
            Image.new("RGB", im.size).save(path)
    with pytest.raises(QuantizationRefused) as refused:
        quantize_version(shipped, NAME, None, blank, **SMALL)
    report = refused.value.report
    assert not report.passed and report.agreement < MIN_AGREEMENT
    assert f"{report.agreement:.4%}" in str(refused.value) and "mean IU" in str(refused.value)
    assert variant_paths(shipped / NAME / "1") == {}
    assert not [p for p in (shipped / NAME / "1").iterdir() if p.name.startswith(".")]


def test_a_plain_folder_of_images_calibrates_on_the_first_and_holds_out_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = image_set(tmp_path, calibration=40, held_out=100)
    assert (len(images.calibration), len(images.held_out), images.labels) == (4, 1, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizationError, match="holds 0 images"):
        image_set(empty, calibration=40, held_out=100)


def test_the_cli_makes_a_variant_of_a_version_and_says_clearly_what_it_cannot_do(
    tmp_path, tiny_repository, synth_root, capsys
):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    photos = tmp_path / "photos"
    photos.mkdir()
    for image_id in (synth_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        shutil.copy(synth_root / "JPEGImages" / f"{image_id}.jpg", photos)
    base = ["quantize", "--repository", str(repo), "--name", "tiny", "--data", str(photos)]
    assert cli(base) == 0
    assert (repo / "tiny" / "2" / "model.int8.onnx").is_file()  # the newest version's
    assert cli(base) == 1 and "exists; pass --force" in capsys.readouterr().err
    assert cli([*base[:-1], str(tmp_path / "nowhere"), "--force"]) == 1
    assert "calibration data not found" in capsys.readouterr().err
    assert cli([*base, "--version", "7"]) == 1 and "no version 7" in capsys.readouterr().err
    # tiny has 4 classes; the synthetic set's labels 9
    labelled = [*base[:-1], str(synth_root), "--force"]
    assert cli(labelled) == 1 and "is it the model's own data?" in capsys.readouterr().err
