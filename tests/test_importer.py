"""`segserve import`: a torchvision segmentation network exported by torch.onnx (random
weights, no download) served with labels equal to PyTorch's; foreign files refused clearly."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from helpers import in_process
from segserve.cli import main
from segserve.export.importer import ImportRefused, describe

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def lraspp(tmp_path_factory):
    """torchvision's LRASPP-MobileNetV3 (5 classes, random weights) exported as users do:
    torch.onnx with dynamic height and width; its output is the dict {"out": ...}."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    path = tmp_path_factory.mktemp("foreign") / "lraspp.onnx"
    dynamic = {0: "batch", 2: "height", 3: "width"}
    # The TorchScript exporter, as most exports in the wild were made (2 s here; the dynamo
    # exporter takes 40 s for this net and names the output after its last node).
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 96, 128),),
        str(path),
        input_names=["x"],
        output_names=["out"],
        dynamic_axes={"x": dynamic, "out": dynamic},
        opset_version=17,
        dynamo=False,
    )
    return net, path


def test_a_torchvision_export_is_imported_with_a_complete_card(lraspp, tmp_path):
    _, path = lraspp
    card = describe(path, "lraspp")
    assert (card.input_name, card.input_layout, card.input_dtype) == ("x", "NCHW", "float32")
    assert card.output == "logits" and card.output_name == "out" and card.num_classes == 5
    assert card.class_names == ["class0", "class1", "class2", "class3", "class4"]
    voc = describe(path, "lraspp", classes=None)
    assert voc.mean == [0.485, 0.456, 0.406]
    # a foreign network's training scale is unknown: fit, unless the importer says native
    assert (card.scale_policy, card.fit_pixels, card.tile_halo) == ("fit", 1_000_000, 128)
    native = describe(path, "lraspp", scale="native", tile_halo=96)
    assert (native.scale_policy, native.tile_halo) == ("native", 96)
    with pytest.raises(ImportRefused, match="names 21 classes; the output has 5"):
        describe(path, "lraspp", classes="voc")


def test_an_imported_model_serves_labels_equal_to_pytorchs(lraspp, tmp_path):
    net, path = lraspp
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"class_names": ["bg", "a", "b", "c", "d"]}))
    repo = tmp_path / "repo"
    assert (
        main(
            [
                "import",
                str(path),
                "--repository",
                str(repo),
                "--name",
                "lraspp",
                "--classes",
                str(classes),
            ]
        )
        == 0
    )
    assert (repo / "lraspp" / "1" / "model.json").is_file()
    rgb = (np.random.default_rng(1).random((75, 101, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    with in_process(repo) as app:
        r = app.post("/segment", content=buf.getvalue(), headers=PNG)
        assert r.status_code == 200 and r.headers["x-model"] == "lraspp"
        served = np.asarray(Image.open(io.BytesIO(r.content)))
        assert app.get("/models/lraspp").json()["classes"][1]["name"] == "a"
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = net(x)["out"].argmax(1)[0].numpy()
    assert (served == expected).mean() >= 0.999


def graph(dims_in, dims_out, outputs=("out",)) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["image"], [o]) for o in outputs]
    g = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, dims_out) for o in outputs],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "model, options, message",
    [
        (graph(["N", 3, 520, 520], ["N", 3, 520, 520]), {}, "fixed height/width"),
        (graph(["N", 3, "H", "W"], ["N", 3]), {}, "rank 2"),
        (graph(["N", 3, "H", "W"], ["N", 3, "H", "W"], ("a", "b")), {}, "--output-name"),
        (
            graph(["N", 3, "H", "W"], ["N", 3, "H", "W"], ("a", "b")),
            {"output_name": "c"},
            "no output 'c'",
        ),
        (graph(["N", 3, "H", 3], ["N", 3, "H", 3]), {}, "--input-layout"),
        (graph(["N", 3, "H", "W"], ["N", "H", "W"]), {}, "--classes"),  # labels: how many?
    ],
)
def test_files_that_cannot_be_served_are_refused_saying_what_to_pass(
    tmp_path, model, options, message
):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ImportRefused, match=message):
        describe(path, "m", **options)


def test_a_foreign_file_dropped_in_without_a_card_is_refused_and_a_model_json_beside_it_is_read(
    lraspp, tmp_path
):
    _, path = lraspp
    repo = tmp_path / "repo"
    (repo / "dropped" / "1").mkdir(parents=True)
    shutil.copy(path, repo / "dropped" / "1" / "model.onnx")
    with in_process(repo) as app:
        failed = app.get("/models").json()["failed"]
        assert failed[0]["name"] == "dropped" and "segserve import" in failed[0]["error"]
        assert app.get("/readyz").status_code == 503  # its only model could not load
    card = describe(path, "dropped").replace(version=1)
    (repo / "dropped" / "1" / "model.json").write_text(card.to_json())
    with in_process(repo) as app:
        assert app.get("/readyz").status_code == 200
        assert app.get("/models/dropped").json()["card"]["output_name"] == "out"
