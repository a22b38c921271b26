"""Export: checkpoint -> ONNX in the repository, dynamic sizes, metadata, parity gate."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import segserve.export.onnx_export as onnx_export
from helpers import make_checkpoint
from segserve.cli import main
from segserve.contracts.card import ModelCard
from segserve.export.onnx_export import export_checkpoint
from segserve.training.checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointError

# Two shapes keep the FCN-8s export test affordable on two cores; the default gate uses five.
FAST_SHAPES = ((1, 37, 53), (2, 75, 101), (1, 129, 67))  # (N, H, W)


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.pt", width=8, batch_norm=True)


@pytest.fixture(scope="module")
def unet_net(unet_ckpt):
    from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(unet_ckpt)).eval()


@pytest.fixture(scope="module")
def unet_export(unet_ckpt, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    return export_checkpoint(unet_ckpt, repo, "shapes", log=lambda *_: None)


def torch_logits(net, pixels: np.ndarray) -> np.ndarray:
    """The PyTorch net on N x H x W x 3 uint8 pixels, normalised the usual way."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        return net(x).numpy()


def pixels(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_export_writes_a_versioned_model_with_metadata(unet_export):
    path = unet_export.path
    assert path.parts[-3:] == ("shapes", "1", "model.onnx")
    assert path.parent.stat().st_mode & 0o755 == 0o755  # readable by the images' non-root user
    card = json.loads((path.parent / "model.json").read_text())
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    # checkpoint -> model.json -> what onnxruntime reads: the same card.
    assert ModelCard.from_metadata(meta) == ModelCard.from_dict(card) == unet_export.card
    assert card["class_names"] == ["background", "class1", "class2", "class3"]
    # segserve's networks run at the images' own scale, with U-Net's measured halo
    assert (card["scale_policy"], card["tile_halo"], meta["scale_policy"]) == (
        "native",
        80,
        "native",
    )
    assert json.loads(meta["mean"]) == IMAGENET_MEAN and json.loads(meta["std"]) == IMAGENET_STD
    assert json.loads(meta["metrics"])["mean_iu"] == 0.7
    for key in (
        "name",
        "architecture",
        "num_classes",
        "input_layout",
        "output",
        "size_divisor",
        "trained_on",
        "exported_at",
        "torch_version",
        "opset",
    ):
        assert key in meta and key in card
    # The default: uint8 pixels in (normalised in the graph), uint8 labels out.
    assert (meta["input_dtype"], meta["input_layout"], meta["output"]) == (
        "uint8",
        "NHWC",
        "labels",
    )
    assert json.loads(meta["parity"])["passed"] is True
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(uint8)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [("labels", "tensor(uint8)")]


def test_exported_graph_takes_any_batch_height_and_width(unet_export, unet_net):
    session = ort.InferenceSession(str(unet_export.path), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert dims[3] == 3 and all(isinstance(d, str) for d in dims[:3])
    for n, h, w in [(3, 203, 149), (1, 17, 300), (1, 2, 2)]:
        x = pixels(n, h, w, seed=h)
        labels = session.run(None, {"image": x})[0]
        assert labels.shape == (n, h, w) and labels.dtype == np.uint8
        assert (labels == torch_logits(unet_net, x).argmax(1)).mean() >= 0.9999


def test_parity_report_covers_odd_sizes_and_a_batch_of_two(unet_export):
    report = unet_export.parity
    assert report.passed and report.max_abs_diff is None and report.agreement >= 0.9999
    shapes = [tuple(s) for s in report.shapes]
    assert any(s[0] == 2 for s in shapes)
    assert any(s[1] % 2 and s[2] % 2 for s in shapes)


def test_versions_count_up_and_are_never_overwritten_without_force(unet_ckpt, tmp_path):
    first = export_checkpoint(
        unet_ckpt, tmp_path, "m", parity_shapes=FAST_SHAPES, log=lambda *_: None
    )
    # The second with onnxruntime's offline optimisation saved in the file: valid, at parity.
    second = export_checkpoint(
        unet_ckpt, tmp_path, "m", parity_shapes=FAST_SHAPES, optimize=True, log=lambda *_: None
    )
    assert second.parity.passed
    assert (first.card.version, second.card.version) == (1, 2)
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(
            unet_ckpt, tmp_path, "m", version=1, parity_shapes=FAST_SHAPES, log=lambda *_: None
        )
    stale = tmp_path / "m" / "1" / "stale.txt"  # --force replaces the whole version folder
    stale.write_text("left by the first export")
    again = export_checkpoint(
        unet_ckpt,
        tmp_path,
        "m",
        version=1,
        force=True,
        parity_shapes=FAST_SHAPES,
        log=lambda *_: None,
    )
    assert again.path.exists() and again.parity.passed and not stale.exists()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]  # no temp folders left


def test_a_model_whose_parity_fails_is_refused(unet_ckpt, tmp_path, monkeypatch, capsys):
    real_convert = onnx_export.convert_network

    def broken_convert(net):
        # A broken export: the graph's weights no longer match the PyTorch net.
        model = real_convert(net)
        for init in model.graph.initializer:
            if len(init.dims) == 4:
                w = onnx.numpy_helper.to_array(init) * 1.5
                init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
        return model

    monkeypatch.setattr(onnx_export, "convert_network", broken_convert)
    code = main(
        ["export", "--checkpoint", str(unet_ckpt), "--repository", str(tmp_path), "--name", "bad"]
    )
    assert code != 0
    assert "parity failed, nothing published" in capsys.readouterr().err
    assert not any((tmp_path / "bad").glob("*/model.onnx"))


def test_the_logits_variant_keeps_the_scores_and_its_argmax_is_the_labels_variant(
    unet_export, unet_ckpt, unet_net, tmp_path
):
    result = export_checkpoint(
        unet_ckpt,
        tmp_path,
        "scores",
        output="logits",
        parity_shapes=FAST_SHAPES,
        log=lambda *_: None,
    )
    assert result.card.output == "logits" and result.card.takes_uint8
    assert result.parity.passed and result.parity.max_abs_diff < 1e-3
    logits_sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    labels_sess = ort.InferenceSession(str(unet_export.path), providers=["CPUExecutionProvider"])
    assert logits_sess.get_outputs()[0].name == "logits"
    x = pixels(2, 99, 131)
    logits = logits_sess.run(None, {"image": x})[0]
    assert logits.shape == (2, 4, 99, 131)
    assert np.abs(logits - torch_logits(unet_net, x)).max() < 1e-3
    assert np.array_equal(labels_sess.run(None, {"image": x})[0], logits.argmax(1))


def test_the_float_input_variant_is_the_older_kind_of_model(unet_ckpt, unet_net, tmp_path):
    result = export_checkpoint(
        unet_ckpt,
        tmp_path,
        "old",
        input="float",
        output="logits",
        parity_shapes=FAST_SHAPES,
        log=lambda *_: None,
    )
    assert (result.card.input_dtype, result.card.input_layout) == ("float32", "NCHW")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    x = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        ref = unet_net(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - ref).max() < 1e-3


def test_fp16_variant_states_its_types_and_reports_parity(unet_ckpt, tmp_path):
    result = export_checkpoint(
        unet_ckpt,
        tmp_path,
        "half",
        fp16=True,
        output="logits",
        parity_shapes=FAST_SHAPES,
        log=lambda *_: None,
    )
    assert result.card.input_dtype == "uint8" and result.card.output_dtype == "float16"
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float16)"
    assert result.parity.agreement >= onnx_export.FP16_MIN_AGREEMENT
    assert result.card.parity["threshold_agreement"] == onnx_export.FP16_MIN_AGREEMENT


@pytest.mark.slow
def test_fcn8s_exports_with_dynamic_sizes(tmp_path):
    ckpt = make_checkpoint(tmp_path / "fcn8s.pt", "fcn8s", num_classes=3)
    result = export_checkpoint(
        ckpt, tmp_path / "repo", "fcn", parity_shapes=FAST_SHAPES[:2], log=lambda *_: None
    )
    assert result.parity.passed and result.card.size_divisor == 32
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": pixels(1, 45, 61)})[0].shape == (1, 45, 61)


def test_missing_corrupt_or_wrong_checkpoints_give_clear_errors(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {}}, wrong)
    for path, message in [
        (tmp_path / "missing.pt", "not found"),
        (corrupt, "not a readable"),
        (wrong, "not a segserve training checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            export_checkpoint(path, tmp_path / "repo", "x", log=lambda *_: None)
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(path),
                    "--repository",
                    str(tmp_path / "repo"),
                    "--name",
                    "x",
                ]
            )
            == 1
        )
        assert message in capsys.readouterr().err


def test_predict_writes_a_palette_png_of_the_inputs_exact_size(unet_export, tmp_path):
    rgb = (np.random.default_rng(1).random((97, 143, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.jpg")
    Image.fromarray(rgb).save(tmp_path / "in2.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "in.jpg"),
                str(tmp_path / "in2.png"),
                "--model",
                str(unet_export.path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    label = Image.open(out / "in.png")
    assert label.mode == "P" and label.size == (143, 97)
    assert label.getpalette()[3:6] == [20, 235, 5]  # the model's own palette, class 1
    assert np.asarray(label).max() < 4
    # The same labels as running the model directly.
    session = ort.InferenceSession(str(unet_export.path), providers=["CPUExecutionProvider"])
    x = np.asarray(Image.open(tmp_path / "in2.png").convert("RGB"))[None]
    assert np.array_equal(
        np.asarray(Image.open(out / "in2.png")), session.run(None, {"image": x})[0][0]
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "in.jpg"),
                "--model",
                str(unet_export.path),
                "--out",
                str(out),
                "--format",
                "overlay",
            ]
        )
        == 0
    )
    assert Image.open(out / "in_overlay.png").size == (143, 97)
    (tmp_path / "text.jpg").write_text("hello")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "text.jpg"),
                "--model",
                str(unet_export.path),
                "--out",
                str(out),
            ]
        )
        == 1
    )


def test_batch_norm_is_folded_into_the_convs_and_computes_the_same(unet_export, unet_net):
    import copy

    net = copy.deepcopy(unet_net)
    torch.manual_seed(0)
    with torch.no_grad():  # statistics far from the fresh 0 / 1, so folding has work to do
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.normal_()
    folded = onnx_export.fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # folded a copy
    x = torch.randn(2, 3, 37, 53)
    with torch.inference_mode():
        assert torch.allclose(folded(x), net(x), atol=1e-4)
    ops = {node.op_type for node in onnx.load(str(unet_export.path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
