"""The ends of an exported graph, added in ONNX around the converted network.

torch converts the network once (float N x 3 x H x W in, logits out); what a client sends and
wants back is then a few nodes on either side: uint8 N x H x W x 3 pixels normalised in the
graph, uint8 labels from an argmax, the whole graph in float16. Converting a network is the
exporter's slow step (10-20 s for a small U-Net on two cores) while these take milliseconds,
so every variant of one checkpoint shares the one conversion. Pure functions: a model in, a
new model out; the parity gate checks what they build against PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ELEMENT_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _dims(value: onnx.ValueInfoProto) -> list[str | int | None]:
    """A value's shape as make_tensor_value_info takes it: names for symbolic dims."""
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
        for d in value.type.tensor_type.shape.dim
    ]


def _only(values, what: str) -> onnx.ValueInfoProto:
    if len(values) != 1:
        raise ValueError(f"the network must have one {what}, it has {len(values)}")
    return values[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def with_pixel_input(
    model: onnx.ModelProto, mean: list[float], std: list[float]
) -> onnx.ModelProto:
    """The network now takes uint8 RGB pixels N x H x W x 3 and normalises them itself:
    (x / 255 - mean) / std as one multiply and one subtract, in the network's float type."""
    out = _copy(model)
    graph = out.graph
    image = _only(graph.input, "input")
    elem = image.type.tensor_type.elem_type
    n, channels, h, w = _dims(image)
    if channels not in (3, None) or elem not in ELEMENT_DTYPES:
        raise ValueError(f"expected a float N x 3 x H x W input, got {_dims(image)}")
    name, normalized = image.name, f"{image.name}/normalized"
    _rename_uses(graph, name, normalized)
    std_a, mean_a = np.asarray(std, np.float64), np.asarray(mean, np.float64)
    dtype = ELEMENT_DTYPES[elem]
    scale = (1 / (255 * std_a)).astype(dtype).reshape(1, 3, 1, 1)
    shift = (mean_a / std_a).astype(dtype).reshape(1, 3, 1, 1)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale, "pixel_scale"),
            numpy_helper.from_array(shift, "pixel_shift"),
        ]
    )
    ends = [
        helper.make_node("Transpose", [name], ["pixels/nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["pixels/nchw"], ["pixels/float"], to=elem),
        helper.make_node("Mul", ["pixels/float", "pixel_scale"], ["pixels/scaled"]),
        helper.make_node("Sub", ["pixels/scaled", "pixel_shift"], [normalized]),
    ]
    nodes = [*ends, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.UINT8, [n, h, w, 3]))
    return out


def with_label_output(model: onnx.ModelProto, name: str = "labels") -> onnx.ModelProto:
    """The network now answers uint8 labels N x H x W: the argmax over its class axis."""
    out = _copy(model)
    graph = out.graph
    logits = _only(graph.output, "output")
    n, _, h, w = _dims(logits)
    graph.node.extend(
        [
            helper.make_node("ArgMax", [logits.name], ["labels/int64"], axis=1, keepdims=0),
            helper.make_node("Cast", ["labels/int64"], [name], to=TensorProto.UINT8),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, [n, h, w]))
    return out


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights, activations, input and output in float16 (onnxruntime's converter: it keeps
    in float32 only the ops that have no float16 kernels)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(_copy(model), keep_io_types=False)  # it edits in place
