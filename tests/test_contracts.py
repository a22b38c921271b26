"""The torch-free contracts every stage shares: model card, repository layout, palette."""

import json

import pytest

from segserve.contracts.card import ModelCard, ModelCardError
from segserve.contracts.palette import pil_palette, voc_palette
from segserve.contracts.repository import (
    MODEL_FILE,
    check_name,
    next_version,
    version_dir,
    versions_of,
    walk,
)


def card(**changes) -> ModelCard:
    values = dict(
        name="m", architecture="unet", num_classes=3, class_names=["bg", "a", "b"],
        palette=[[0, 0, 0], [1, 2, 3], [4, 5, 6]], mean=[0.5] * 3, std=[0.25] * 3,
        output="labels", size_divisor=16, input_dtype="uint8", input_layout="NHWC",
    )  # fmt: skip
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
