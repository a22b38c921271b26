import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segserve.cli import MODEL_NAMES, main
from segserve.training.checkpoint import CheckpointError, load_checkpoint
from segserve.training.datasets import DatasetError, VOCSegmentation
from segserve.training.evaluate import TrainingSetupError
from segserve.training.synth import SYNTH_CLASSES, SynthConfig, render_sample, write_dataset
from segserve.training.train import TrainConfig, autocast_dtype, native_bf16, train


def test_every_architecture_the_contract_names_builds_with_its_stride():
    """The CLI and exporter name architectures from segserve.contracts (no torch); each
    one builds, and padding an input to its size divisor is what the network itself needs."""
    from segserve.contracts.architectures import size_divisor
    from segserve.models import UNet, build_model
    from segserve.models.fcn import VGG16_BLOCKS

    assert MODEL_NAMES == ("fcn32s", "fcn16s", "fcn8s", "unet")
    for name in MODEL_NAMES:
        with torch.device("meta"):  # the structure without 134 M real parameters
            model = build_model(name, 2)
        expected = UNet.size_divisor if isinstance(model, UNet) else 2 ** len(VGG16_BLOCKS)
        assert size_divisor(name) == expected


def test_synthetic_samples_are_deterministic_and_labelled_like_voc():
    config = SynthConfig(count=5, seed=7)
    a_img, a_lab = render_sample(config, 3)
    b_img, b_lab = render_sample(config, 3)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert np.array_equal(np.asarray(a_lab), np.asarray(b_lab))
    other, _ = render_sample(SynthConfig(count=5, seed=8), 3)
    assert not np.array_equal(np.asarray(a_img), np.asarray(other))
    labels = np.asarray(a_lab)
    assert a_lab.mode == "P" and a_lab.size == a_img.size
    assert 160 <= a_img.width <= 512 and 160 <= a_img.height <= 512
    assert set(np.unique(labels)) <= set(range(len(SYNTH_CLASSES))) | {255}
    assert (labels == 255).any(), "objects carry an ignore band along their borders"


def test_synthetic_colours_do_not_decide_the_class():
    # Mean colour of each class's pixels over many images: every class spans a wide range.
    config = SynthConfig(count=40, seed=0, min_size=96, max_size=128)
    colours: dict[int, list] = {}
    for i in range(40):
        image, label = render_sample(config, i)
        img, lab = np.asarray(image).reshape(-1, 3), np.asarray(label).ravel()
        for c in np.unique(lab):
            if c not in (0, 255):
                colours.setdefault(int(c), []).append(img[lab == c].mean(0))
    assert len(colours) == len(SYNTH_CLASSES) - 1, "every object class appears"
    for samples in colours.values():
        if len(samples) >= 4:
            assert np.ptp(np.array(samples), axis=0).max() > 80


def test_synth_cli_writes_a_voc_layout_folder(tmp_path):
    out = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(out),
                "--count",
                "10",
                "--min-size",
                "64",
                "--max-size",
                "96",
            ]
        )
        == 0
    )
    ds = VOCSegmentation(out, "train")
    assert len(ds) == 8 and len(VOCSegmentation(out, "val")) == 2
    assert ds.class_names == list(SYNTH_CLASSES)
    image, target = ds[0]
    assert image.size == target.size
    assert json.loads((out / "classes.json").read_text())["palette"][1] == [128, 0, 0]


def test_a_real_voc_layout_without_classes_json_reads_as_voc(synth_root, tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(synth_root, root)
    (root / "classes.json").unlink()
    ds = VOCSegmentation(tmp_path, "val")  # the folder above VOCdevkit works too
    assert ds.num_classes == 21 and ds.class_names[15] == "person"


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "not found"),
        ("not_voc", "not a VOC-layout folder"),
        ("no_split", "no split 'val'"),
        ("missing_png", "lack a JPEGImages/ID.jpg or SegmentationClass/ID.png"),
        ("bad_classes_json", "malformed"),
        ("label_out_of_range", "holds class id"),
    ],
)
def test_bad_data_folders_give_clear_errors(synth_root, tmp_path, breakage, message):
    root = tmp_path / "data"
    if breakage == "missing":
        root = tmp_path / "nowhere"
    elif breakage == "not_voc":
        root.mkdir()
        (root / "JPEGImages").mkdir()
    else:
        shutil.copytree(synth_root, root)
        if breakage == "no_split":
            (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
        elif breakage == "missing_png":
            first = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
            (root / "SegmentationClass" / f"{first}.png").unlink()
        elif breakage == "bad_classes_json":
            (root / "classes.json").write_text("{not json")
    if breakage == "label_out_of_range":
        first = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
        path = root / "SegmentationClass" / f"{first}.png"
        lab = np.asarray(Image.open(path)).copy()
        lab[0, 0] = 40
        Image.fromarray(lab, "L").save(path)
        with pytest.raises(DatasetError, match=message):
            VOCSegmentation(root, "val")[0]
        return
    with pytest.raises(DatasetError, match=message):
        VOCSegmentation(root, "val")


def _overfit_folder(synth_root, tmp_path, n=4):
    """Train and val on the same few images: a net that learns must overfit them."""
    root = tmp_path / "overfit"
    shutil.copytree(synth_root, root)
    sets = root / "ImageSets" / "Segmentation"
    ids = sets.joinpath("train.txt").read_text().split()[:n]
    sets.joinpath("train.txt").write_text("\n".join(ids))
    sets.joinpath("val.txt").write_text("\n".join(ids))
    return root


def _config(data, out, **changes) -> TrainConfig:
    values = dict(
        data=data,
        out=out,
        model="unet",
        width=8,
        batch_norm=True,
        optimizer="adamw",
        lr=0.01,
        weight_decay=0.0,
        batch_size=4,
        crop_size=96,
        scale=(1, 1),
        workers=0,
        progress=False,
        device="cpu",
    )
    return TrainConfig(**{**values, **changes})


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_tiny_training_run_overfits(tmp_path):
    """Trained and validated on the same four images, each a few large objects: a net that
    learns overfits them within 40 steps (one an epoch, so every epoch is a measurement)."""
    torch.set_num_threads(2)
    data, out = tmp_path / "data", tmp_path / "run"
    large = SynthConfig(
        count=5, seed=11, min_size=64, max_size=96, max_objects=3, object_scale=(0.4, 0.8)
    )
    write_dataset(data, large, progress=False)
    sets = data / "ImageSets" / "Segmentation"
    sets.joinpath("val.txt").write_text(sets.joinpath("train.txt").read_text())
    # median weighting as the default recipe had it: in 40 steps small classes need it
    train(_config(data, out, epochs=40, crop_size=64, class_weighting="median"))
    rows = _rows(out)
    assert len(rows) == 40
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < 0.5 * float(first["train_loss"])
    assert float(last["mean_iu"]) > float(first["mean_iu"]) + 0.2
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.csv", "config.json"}
    best = load_checkpoint(out / "best.pt")
    assert best["metrics"]["mean_iu"] == max(float(r["mean_iu"]) for r in rows)
    assert best["class_names"] == list(SYNTH_CLASSES) and best["architecture"] == "unet"
    assert best["model_options"] == {"width": 8, "batch_norm": True}
    assert best["provenance"]["config"]["epochs"] == 40
    assert best["provenance"]["data"]["count"] == 5


def test_resume_continues_the_same_run(synth_root, tmp_path):
    data = _overfit_folder(synth_root, tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_config(data, straight, epochs=3))
    # The same 3-epoch run (same LR schedule), cut off after epoch 2; --resume picks it up.
    train(_config(data, split, epochs=3, stop_after=2))
    assert len(_rows(split)) == 2
    train(_config(data, split, epochs=3, resume=True))
    a, b = _rows(straight), _rows(split)
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for ra, rb in zip(a, b, strict=True):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-4)
        assert float(ra["mean_iu"]) == pytest.approx(float(rb["mean_iu"]), rel=1e-4)


def test_auto_precision_is_float16_on_cuda_and_bfloat16_only_where_the_cpu_has_it():
    # No CUDA here: the choice is a function of the device, not of a live GPU.
    assert autocast_dtype(torch.device("cuda", 0), "auto") == torch.float16
    assert autocast_dtype(torch.device("cuda", 0), "float32") is None
    assert autocast_dtype(torch.device("cpu"), "float32") is None
    assert autocast_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    expected = torch.bfloat16 if native_bf16() else None
    assert autocast_dtype(torch.device("cpu"), "auto") == expected
    with pytest.raises(TrainingSetupError, match="CUDA"):
        autocast_dtype(torch.device("cpu"), "float16")


def test_a_bfloat16_run_tracks_float32_and_saves_float32_weights(synth_root, tmp_path):
    """Both arithmetics on every CPU: bfloat16 forced where it is emulated, float32 forced
    where bf16 is native (where `auto` would never train in float32)."""
    data = _overfit_folder(synth_root, tmp_path)
    runs = {p: tmp_path / p for p in ("float32", "bfloat16")}
    for precision, out in runs.items():
        train(_config(data, out, epochs=2, precision=precision))
    plain, mixed = (_rows(runs[p]) for p in ("float32", "bfloat16"))
    assert len(plain) == len(mixed) == 2
    # the same seed and data; only the arithmetic differs, so the first epoch's loss is close
    assert float(mixed[0]["train_loss"]) == pytest.approx(float(plain[0]["train_loss"]), rel=0.1)
    ckpt = load_checkpoint(runs["bfloat16"] / "best.pt")
    assert all(
        t.dtype == torch.float32 for t in ckpt["state_dict"].values() if t.is_floating_point()
    )
    assert ckpt["provenance"]["arithmetic"] == "bfloat16"
    assert load_checkpoint(runs["float32"] / "best.pt")["provenance"]["arithmetic"] == "float32"


def test_resume_without_a_run_fails_clearly(synth_root, tmp_path):
    with pytest.raises(TrainingSetupError, match="no .*last.pt"):
        train(_config(synth_root, tmp_path / "empty", epochs=1, resume=True))


def test_eval_cli_prints_the_metrics_as_json(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    train(_config(synth_root, out, epochs=1))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--data",
                str(synth_root),
                "--checkpoint",
                str(out / "best.pt"),
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {
        "pixel_accuracy",
        "mean_accuracy",
        "mean_iu",
        "fw_iu",
        "per_class_iu",
        "num_images",
        "pixels",
    }
    assert scores["num_images"] == len(VOCSegmentation(synth_root, "val"))
    # The same network scored by training and by eval: training may have run it in another
    # memory layout (channels-last where bf16 is native), on kernels whose near ties fall
    # otherwise, so the scores agree closely, not to the bit.
    assert abs(scores["mean_iu"] - load_checkpoint(out / "best.pt")["metrics"]["mean_iu"]) <= 1e-3
    main(
        ["eval", "--data", str(synth_root), "--checkpoint", str(out / "best.pt"), "--device", "cpu"]
    )
    assert "mean IU" in capsys.readouterr().out


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a readable segserve checkpoint"):
        load_checkpoint(corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="not a segserve training checkpoint"):
        load_checkpoint(wrong)


def test_every_train_flag_is_a_config_field_and_the_cli_builds_the_same_config(tmp_path):
    import dataclasses

    from segserve.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "d",
            "--model",
            "fcn16s",
            "--out",
            str(tmp_path),
            "--lr",
            "1e-3",
            "--scale",
            "1",
            "2",
            "--precision",
            "float32",
            "--init-from",
            "x.pt",
        ]
    )
    flags = set(vars(args)) - {"command", "func"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_mapping(vars(args))
    assert (cfg.model, cfg.lr, cfg.scale, cfg.precision) == ("fcn16s", 1e-3, (1.0, 2.0), "float32")
    assert cfg.init_from == Path("x.pt") and cfg.out == tmp_path
