"""`segserve import`: a segmentation ONNX file from elsewhere into the model repository.

segserve export writes its own model card; a network exported by another tool (torchvision's
FCN / DeepLabV3 / LRASPP through torch.onnx, a U-Net from another project) has none. This
reads what the graph says (its input's dtype and layout, its outputs, the number of classes
from the output's channels), takes the rest from the options, checks with onnxruntime that
the graph runs at two odd sizes and answers at the input's size, and writes a repository
version whose card is complete. When the graph cannot be served, it says why and what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from segserve.contracts.card import DEFAULT_FIT_PIXELS, IMAGENET_MEAN, IMAGENET_STD, ModelCard
from segserve.contracts.palette import VOC_CLASSES, voc_palette
from segserve.contracts.repository import next_version, publishing, version_dir, write_version
from segserve.errors import UserError

DTYPES = {
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
}
CHECK_SIZES = ((1, 37, 53), (2, 64, 48))  # (N, H, W): odd, and a batch of two


class ImportRefused(UserError, ValueError):
    """The file cannot be served as it is; the message says why and what to pass."""


@dataclass
class Tensor:
    name: str
    dtype: int
    dims: list  # int for fixed, str (symbolic) or None for dynamic


def _tensors(values) -> list[Tensor]:
    out = []
    for v in values:
        shape = v.type.tensor_type.shape
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim
        ]
        out.append(Tensor(v.name, v.type.tensor_type.elem_type, dims))
    return out


def _input(model: onnx.ModelProto, layout: str | None) -> tuple[Tensor, str]:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [t for t in _tensors(model.graph.input) if t.name not in initializers]
    if len(inputs) != 1:
        raise ImportRefused(
            f"the graph takes {len(inputs)} inputs ({', '.join(t.name for t in inputs)}); "
            "segserve feeds it one image batch"
        )
    (image,) = inputs
    if image.dtype not in DTYPES:
        raise ImportRefused(
            f"input {image.name!r} is {onnx.TensorProto.DataType.Name(image.dtype)}; "
            "segserve feeds uint8, float32 or float16 images"
        )
    if len(image.dims) != 4:
        raise ImportRefused(
            f"input {image.name!r} has rank {len(image.dims)}; an image batch is 4-D"
        )
    if layout is None:
        channels_first, channels_last = image.dims[1] == 3, image.dims[3] == 3
        if channels_first == channels_last:
            raise ImportRefused(
                f"input {image.name!r} has shape {image.dims}: pass --input-layout NCHW or NHWC"
            )
        layout = "NCHW" if channels_first else "NHWC"
    spatial = image.dims[2:4] if layout == "NCHW" else image.dims[1:3]
    fixed = [d for d in spatial if isinstance(d, int) and d > 0]
    if fixed:
        raise ImportRefused(
            f"input {image.name!r} has a fixed height/width {spatial}: segserve serves images "
            "of any size; export the network again with dynamic height and width (torch.onnx: "
            "dynamic_shapes or dynamic_axes for dims 2 and 3)"
        )
    return image, layout


def _output(model: onnx.ModelProto, name: str | None) -> Tensor:
    outputs = _tensors(model.graph.output)
    if name is not None:
        chosen = [t for t in outputs if t.name == name]
        if not chosen:
            raise ImportRefused(f"no output {name!r}; the graph has {[t.name for t in outputs]}")
        return chosen[0]
    if len(outputs) == 1:
        return outputs[0]
    if "out" in [t.name for t in outputs]:  # torchvision's segmentation models: {"out", "aux"}
        return next(t for t in outputs if t.name == "out")
    raise ImportRefused(
        f"the graph has outputs {[t.name for t in outputs]}: name the segmentation with --output-name"
    )


def _classes(spec: str | None, count: int | None) -> tuple[list[str], list[list[int]]]:
    if spec == "voc":
        names, palette = list(VOC_CLASSES), voc_palette(len(VOC_CLASSES))
    elif spec is not None:
        data = json.loads(Path(spec).read_text())
        names = [str(n) for n in data["class_names"]]
        palette = data.get("palette") or voc_palette(len(names))
    elif count is not None:
        names, palette = [f"class{i}" for i in range(count)], voc_palette(count)
    else:
        raise ImportRefused(
            "the output does not say how many classes: pass --classes voc|FILE.json"
        )
    if count is not None and len(names) != count:
        raise ImportRefused(
            f"--classes names {len(names)} classes; the output has {count} channels"
        )
    return names, palette


def _channels(model_path: Path, image: Tensor, layout: str, output: str) -> int | None:
    """The output's channel count, from one run at 64x64 (None when the graph cannot run)."""
    import onnxruntime as ort

    shape = (1, 3, 64, 64) if layout == "NCHW" else (1, 64, 64, 3)
    dtype = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.FLOAT16: np.float16}.get(
        image.dtype, np.float32
    )
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        return int(session.run([output], {image.name: np.zeros(shape, dtype)})[0].shape[1])
    except Exception:  # noqa: BLE001 - the caller asks for --classes instead
        return None


def describe(
    model_path: Path,
    name: str,
    classes: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    output_name: str | None = None,
    input_layout: str | None = None,
    size_divisor: int = 1,
    architecture: str = "imported",
    scale: str = "fit",
    tile_halo: int | None = None,
    fit_pixels: int = DEFAULT_FIT_PIXELS,
) -> ModelCard:
    """The card for a foreign ONNX file, from its graph and the options. A foreign network's
    training scale is unknown: by default it is served `fit` (scaled to `fit_pixels`, what
    a model trained on photos of one size expects); `scale="native"` tiles large images
    with `tile_halo` px of context (default: DEFAULT_TILE_HALO, unmeasured)."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds
        raise ImportRefused(f"{model_path} is not an ONNX file: {exc}") from exc
    image, layout = _input(model, input_layout)
    out = _output(model, output_name)
    if len(out.dims) == 4:
        declared = out.dims[1] if isinstance(out.dims[1], int) and out.dims[1] > 0 else None
        # Undeclared (a symbolic dim): ask the graph itself.
        count = declared or _channels(model_path, image, layout, out.name)
        kind = "logits"
    elif len(out.dims) == 3:
        kind, count = "labels", None
    else:
        raise ImportRefused(
            f"output {out.name!r} has rank {len(out.dims)}: a segmentation output is [N, C, H, W] "
            "scores or [N, H, W] labels"
        )
    names, palette = _classes(classes, count)
    return ModelCard(
        name=name,
        architecture=architecture,
        num_classes=len(names),
        class_names=names,
        palette=palette,
        mean=mean or IMAGENET_MEAN,
        std=std or IMAGENET_STD,
        output=kind,
        output_name=out.name,
        input_name=image.name,
        input_dtype=DTYPES[image.dtype],
        input_layout=layout,
        size_divisor=size_divisor,
        producer=f"segserve import ({model.producer_name})",
        trained_on="unknown (imported)",
        scale_policy=scale,
        fit_pixels=fit_pixels,
        tile_halo=tile_halo,
    )


def check_runs(path: Path, card: ModelCard) -> None:
    """onnxruntime runs the file at odd sizes and answers at the input's size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in CHECK_SIZES:
        pixels = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        feed = pixels if card.takes_uint8 else pixels.astype(card.input_dtype)
        if card.input_layout == "NCHW":
            feed = feed.transpose(0, 3, 1, 2)
        try:
            out = session.run([card.output_name], {card.input_name: np.ascontiguousarray(feed)})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors
            raise ImportRefused(f"onnxruntime cannot run the graph at {h}x{w}: {exc}") from exc
        if out.shape[0] != n or out.shape[-2:] != (h, w):
            raise ImportRefused(
                f"for an {h}x{w} input the output is {list(out.shape)}: segserve needs the "
                "labels at the input's size (add the final upsampling to the graph)"
            )


def import_model(
    model_path: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    force: bool = False,
    **options,
) -> Path:
    """Write REPO/NAME/VERSION/{model.onnx, model.json}; returns the version folder."""
    card = describe(Path(model_path), name, **options)
    repository = Path(repository)
    version = next_version(repository, name) if version is None else version
    card = card.replace(version=version)
    with publishing(repository, name, version, force) as folder:
        check_runs(write_version(folder, onnx.load(str(model_path)), card), card)
    return version_dir(repository, name, version)
