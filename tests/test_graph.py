"""The ends added around a converted network: pixel input, label output, float16."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segserve.contracts.card import IMAGENET_MEAN, IMAGENET_STD
from segserve.export.graph import to_float16, with_label_output, with_pixel_input

WEIGHT = np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32)


def network() -> onnx.ModelProto:
    """A 1x1 convolution standing in for a converted network: float N x 3 x H x W in,
    four classes' logits out, N, H and W symbolic as the exporter leaves them."""
    conv = helper.make_node("Conv", ["image", "weight"], ["logits"])
    g = helper.make_graph(
        [conv],
        "net",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.FLOAT, ["batch", 3, "height", "width"]
            )
        ],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", 4, "height", "width"]
            )
        ],
        initializer=[numpy_helper.from_array(WEIGHT, "weight")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def reference_logits(pixels: np.ndarray) -> np.ndarray:
    x = pixels.transpose(0, 3, 1, 2).astype(np.float64) / 255
    x = (x - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    return np.einsum("oc,nchw->nohw", WEIGHT[:, :, 0, 0].astype(np.float64), x)


def pixels(n=2, h=5, w=7) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_pixel_input_takes_uint8_nhwc_and_normalises_like_the_training_code():
    model = with_pixel_input(network(), IMAGENET_MEAN, IMAGENET_STD)
    image = model.graph.input[0]
    assert image.name == "image" and image.type.tensor_type.elem_type == TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch", "height", "width", 3]
    x = pixels()
    np.testing.assert_allclose(run(model, x), reference_logits(x), atol=1e-5)


def test_label_output_is_the_uint8_argmax_over_classes_at_any_size():
    model = with_label_output(with_pixel_input(network(), IMAGENET_MEAN, IMAGENET_STD))
    out = model.graph.output[0]
    assert out.name == "labels" and out.type.tensor_type.elem_type == TensorProto.UINT8
    for n, h, w in [(1, 1, 1), (3, 17, 9)]:
        x = pixels(n, h, w)
        labels = run(model, x)
        assert labels.dtype == np.uint8 and labels.shape == (n, h, w)
        assert np.array_equal(labels, reference_logits(x).argmax(1))


def test_float16_turns_weights_input_and_output_to_half_and_leaves_its_argument_alone():
    original = network()
    half = to_float16(original)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert original == network()  # the converter edits in place: it is given a copy
    # With pixels in, the normalisation runs in float16 too: the card's uint8 -> float16 logits.
    model = with_pixel_input(half, IMAGENET_MEAN, IMAGENET_STD)
    x = pixels()
    logits = run(model, x)
    assert logits.dtype == np.float16
    np.testing.assert_allclose(logits, reference_logits(x), atol=2e-2)


def test_a_graph_that_is_not_one_image_in_one_logits_out_is_refused():
    two_inputs = network()
    two_inputs.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(ValueError, match="one input, it has 2"):
        with_pixel_input(two_inputs, IMAGENET_MEAN, IMAGENET_STD)
    gray = network()
    gray.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        with_pixel_input(gray, IMAGENET_MEAN, IMAGENET_STD)
