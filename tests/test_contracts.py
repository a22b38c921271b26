"""The torch-free contracts every stage shares: model card, repository layout, palette,
architectures' strides."""

import json
import math
import os

import onnx
import pytest

from segserve.contracts.architectures import padded_size
from segserve.contracts.card import ModelCard, ModelCardError, read_card
from segserve.contracts.palette import pil_palette, voc_palette
from segserve.contracts.repository import (
    CARD_FILE,
    MODEL_FILE,
    check_name,
    next_version,
    publishing,
    version_dir,
    versions_of,
    walk,
    write_version,
)


def card(**changes) -> ModelCard:
    values = dict(
        name="m",
        architecture="unet",
        num_classes=3,
        class_names=["bg", "a", "b"],
        palette=[[0, 0, 0], [1, 2, 3], [4, 5, 6]],
        mean=[0.5] * 3,
        std=[0.25] * 3,
        output="labels",
        size_divisor=16,
        input_dtype="uint8",
        input_layout="NHWC",
    )
    return ModelCard.from_dict({**values, **changes})


def test_card_survives_onnx_metadata_strings_and_json_unchanged():
    original = card(metrics={"mean_iu": 0.5}, parity={"passed": True}, opset=18, version=4)
    props = original.to_metadata()
    assert all(isinstance(v, str) for v in props.values())
    assert props["name"] == "m" and json.loads(props["palette"])[1] == [1, 2, 3]
    assert ModelCard.from_metadata(props) == original
    assert ModelCard.from_dict(json.loads(original.to_json())) == original


def test_output_name_defaults_to_the_output_kind_and_can_differ():
    assert card().output_name == "labels"
    foreign = card(output="logits", output_name="out", input_dtype="float32", input_layout="NCHW")
    assert foreign.output_name == "out" and foreign.output_dtype == "float32"


def test_cards_written_before_uint8_inputs_read_as_float_nchw_models():
    old = card().to_metadata()
    old.update(input_layout="NCHW float16", output="logits", output_dtype="float16")
    del old["input_dtype"], old["output_name"]
    parsed = ModelCard.from_metadata(old)
    assert (parsed.input_layout, parsed.input_dtype, parsed.output_name) == (
        "NCHW",
        "float16",
        "logits",
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"class_names": ["bg"]}, "class_names"),
        ({"palette": [[0, 0, 0]]}, "palette"),
        ({"palette": [[0, 0, 300]] * 3}, "palette"),
        ({"output": "scores"}, "output must be"),
        ({"input_dtype": "int64"}, "input_dtype"),
        ({"input_layout": "HWC"}, "input_layout"),
        ({"std": [0, 1, 1]}, "std"),
        ({"num_classes": "many"}, "malformed"),
    ],
)
def test_bad_cards_are_refused_with_the_reason(changes, message):
    with pytest.raises(ModelCardError, match=message):
        card(**changes)


def test_a_card_missing_required_keys_says_how_to_make_one():
    with pytest.raises(ModelCardError, match="segserve import"):
        ModelCard.from_metadata({"name": "x"})


def test_class_ids_by_name_or_ascii_digits_only():
    c = card()
    assert c.class_id("a") == 1 and c.class_id("2") == 2
    for bad in ("3", "²", "१", "-1", "zebra"):
        with pytest.raises(KeyError):
            c.class_id(bad)


def test_repository_walk_finds_versions_in_numeric_order_and_skips_the_rest(tmp_path):
    for rel in ("m/1", "m/2", "m/10", "m/01", "m/x", "m/٣", "n/1", ".tmp-m/1", "bad name/1"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / MODEL_FILE).write_bytes(b"")
    (tmp_path / "m" / "3").mkdir()  # a version folder without a model file
    entries = [(e.name, e.version) for e in walk(tmp_path)]
    assert entries == [("m", 1), ("m", 2), ("m", 10), ("n", 1)]
    assert versions_of(tmp_path, "m") == [1, 2, 10] and next_version(tmp_path, "m") == 11
    assert next_version(tmp_path, "new") == 1 and list(walk(tmp_path / "missing")) == []


def test_model_names_are_checked_where_they_become_paths(tmp_path):
    assert version_dir(tmp_path, "unet-shapes", 2) == tmp_path / "unet-shapes" / "2"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "ünïcode"):
        with pytest.raises(ValueError, match="bad model name"):
            check_name(bad)
    with pytest.raises(ValueError, match="count from 1"):
        version_dir(tmp_path, "m", 0)


def test_palette_is_vocs_colour_map():
    palette = voc_palette()
    assert palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]] and palette[15] == [192, 128, 128]
    flat = pil_palette([[9, 9, 9]])
    assert len(flat) == 768 and list(flat[:3]) == [9, 9, 9] and list(flat[3:6]) == [128, 0, 0]


def test_padded_size_rounds_each_side_up_to_the_divisor():
    assert padded_size((37, 53), 16) == (48, 64)
    assert padded_size((32, 64), 32) == (32, 64)
    assert padded_size((1, 1), 1) == (1, 1)


def test_a_checkpoint_becomes_a_card_with_its_stride_scores_and_per_class_iu():
    ckpt = {
        "architecture": "fcn8s",
        "model_options": {},
        "num_classes": 2,
        "class_names": ["bg", "cat"],
        "palette": [[0, 0, 0], [9, 9, 9], [7, 7, 7]],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "trained_on": "data/x",
        "metrics": {"mean_iu": 0.5, "pixels": 10, "per_class_iu": [0.9, math.nan]},
        "provenance": {"commit": "abc", "arithmetic": "float32"},
    }
    made = ModelCard.from_checkpoint(ckpt, name="m", version=2, output="labels")
    assert made.size_divisor == 32 and made.palette == [[0, 0, 0], [9, 9, 9]]
    assert made.metrics == {
        "pixel_accuracy": None,
        "mean_accuracy": None,
        "mean_iu": 0.5,
        "fw_iu": None,
        "per_class_iu": {"bg": 0.9, "cat": None},  # NaN (absent class) is not JSON
    }
    assert made.provenance == {"commit": "abc", "arithmetic": "float32"}
    assert ModelCard.from_dict(json.loads(made.to_json())) == made


def test_a_card_is_read_from_the_file_first_and_from_model_json_beside_it_else(tmp_path):
    beside = tmp_path / CARD_FILE
    assert read_card(card(name="inside").to_metadata(), beside).name == "inside"
    beside.write_text(card(name="beside").to_json())
    assert read_card({}, beside).name == "beside"
    beside.write_text("{not json")
    with pytest.raises(ModelCardError, match="not a model card"):
        read_card({}, beside)
    with pytest.raises(ModelCardError, match="segserve import"):
        read_card({}, tmp_path / "missing.json")


def tiny_onnx() -> onnx.ModelProto:
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return onnx.helper.make_model(graph)


def test_a_version_is_published_whole_with_its_card_inside_and_beside(tmp_path):
    with publishing(tmp_path, "m", 1) as folder:
        assert list(walk(tmp_path)) == []  # nothing visible while it is written
        write_version(folder, tiny_onnx(), card(version=1))
    target = version_dir(tmp_path, "m", 1)
    props = {p.key: p.value for p in onnx.load(str(target / MODEL_FILE)).metadata_props}
    assert ModelCard.from_metadata(props) == card(version=1)
    assert json.loads((target / CARD_FILE).read_text())["version"] == 1
    assert os.stat(target).st_mode & 0o777 == 0o755  # readable by a server of another uid
    assert sorted(p.name for p in tmp_path.joinpath("m").iterdir()) == ["1"]


def test_a_failed_publication_leaves_the_repository_as_it_was(tmp_path):
    with publishing(tmp_path, "m", 1) as folder:
        write_version(folder, tiny_onnx(), card())
    before = (version_dir(tmp_path, "m", 1) / MODEL_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="--force"), publishing(tmp_path, "m", 1):
        pass
    with pytest.raises(RuntimeError, match="parity"), publishing(tmp_path, "m", 1, True) as folder:
        (folder / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("parity failed")
    assert (version_dir(tmp_path, "m", 1) / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.joinpath("m").iterdir()) == ["1"]
