"""Checkpoint -> ONNX with dynamic N, H, W, the model card as metadata, and a parity gate.

By default the graph takes what a decoder produces and gives what a client wants: uint8
RGB pixels N x H x W x 3 in (normalised inside the graph) and uint8 labels N x H x W out
(argmax inside the graph). The server then does no float work at all, and on a GPU the
bytes crossing the bus drop 4x in and about 4*C x out. `--output logits` keeps the scores;
`--input float` keeps the older float N x 3 x H x W input, normalised by the caller.
torch converts the network once; each variant is that graph with its ends added in ONNX
(segserve.export.graph), `--fp16` included.

Nothing is published to the repository until onnxruntime reproduces PyTorch on several
odd sizes and a batch of two; a failing export leaves the repository as it was.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from segserve.contracts.architectures import tile_halo as architecture_halo
from segserve.contracts.card import DEFAULT_FIT_PIXELS, ModelCard
from segserve.contracts.repository import (
    MODEL_FILE,
    next_version,
    publishing,
    version_dir,
    write_version,
)
from segserve.errors import UserError
from segserve.export import graph
from segserve.export.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_HELD_OUT_IMAGES,
    quantize_folder,
)
from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint

OPSET = 18
TRACE_SIZE = (64, 64)
# (N, H, W): odd sizes, sizes not divisible by 32, far from the trace size, a batch of two.
PARITY_SHAPES = ((1, 37, 53), (2, 75, 101), (1, 1, 1), (1, 257, 191), (1, 320, 480))
FP32_MAX_ABS = 1e-3
FP32_MIN_AGREEMENT = 0.9999
# fp16 rounds logits to ~3 significant digits, so near-ties between classes may flip: we
# require 99.5 % of pixels to keep their fp32 label (and report the figure).
FP16_MIN_AGREEMENT = 0.995


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """A copy of an eval-mode net with each BatchNorm2d that follows a Conv2d (inside an
    nn.Sequential, as U-Net builds them) folded into that conv's weights and bias. The
    exporter's decomposition of batch norm is its slowest step (a width-8 U-Net converts in
    about 20 % less time folded); the file is the same kind of graph, since the exporter's
    optimiser folded those pairs in the end anyway. The parity gate compares with the
    unfolded net."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(net).eval()
    for block in folded.modules():
        if not isinstance(block, nn.Sequential):
            continue
        for i in range(len(block) - 1):
            if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                block[i + 1] = nn.Identity()
    return folded


class ParityError(UserError, RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the thresholds."""


@dataclass
class ParityReport:
    shapes: list[tuple[int, ...]]
    max_abs_diff: float | None  # None for the argmax variant: labels have no |delta logits|
    agreement: float
    threshold_max_abs: float | None
    threshold_agreement: float
    per_shape: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        ok_abs = self.threshold_max_abs is None or (
            self.max_abs_diff is not None and self.max_abs_diff <= self.threshold_max_abs
        )
        return ok_abs and self.agreement >= self.threshold_agreement

    def as_dict(self) -> dict:
        return {
            "shapes": [list(s) for s in self.shapes],
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": self.agreement,
            "threshold_max_abs": self.threshold_max_abs,
            "threshold_agreement": self.threshold_agreement,
            "passed": self.passed,
        }


def model_card(
    ckpt: dict,
    name: str,
    version: int,
    fp16: bool,
    labels: bool,
    uint8_input: bool,
    scale: str = "native",
    tile_halo: int | None = None,
    fit_pixels: int = DEFAULT_FIT_PIXELS,
) -> ModelCard:
    """The card of what is being exported: the checkpoint's fields and the export's own."""
    return ModelCard.from_checkpoint(
        ckpt,
        name=name,
        version=version,
        input_dtype="uint8" if uint8_input else "float16" if fp16 else "float32",
        input_layout="NHWC" if uint8_input else "NCHW",
        precision="float16" if fp16 else "float32",
        output="labels" if labels else "logits",
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=str(torch.__version__),
        opset=OPSET,
        scale_policy=scale,
        fit_pixels=fit_pixels,
        tile_halo=tile_halo if tile_halo is not None else architecture_halo(ckpt["architecture"]),
    )


def convert_network(net: nn.Module) -> onnx.ModelProto:
    """The one torch -> ONNX conversion (the dynamo exporter) of a float32 network: float
    N x 3 x H x W `image` in, `logits` out, with N, H and W symbolic (no size baked in).
    Every variant is this graph with its ends added (segserve.export.graph)."""
    h, w = TRACE_SIZE
    program = torch.onnx.export(
        net,
        (torch.randn(1, 3, h, w),),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"image": {0: "batch", 2: "height", 3: "width"}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    return program.model_proto


def variant_graph(network: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """The converted network as the card describes it: float16 or not, uint8 pixels or
    float in, labels or logits out."""
    model = graph.to_float16(network) if card.precision == "float16" else network
    if card.takes_uint8:
        model = graph.with_pixel_input(model, card.mean, card.std)
    if card.output == "labels":
        model = graph.with_label_output(model)
    return model


def checked_model(path: Path, card: ModelCard) -> onnx.ModelProto:
    """The exported graph, described and checked, ready to publish."""
    model = onnx.load(str(path))
    model.doc_string = f"segserve {card.architecture} ({card.name} v{card.version})"
    onnx.checker.check_model(model, full_check=True)
    return model


def optimize_offline(src: Path, dst: Path) -> None:
    """onnxruntime's provider-independent graph optimisations (fusions, constant folding),
    saved in the file. 'extended' and 'all' would bake in CPU-only layouts (NCHWc), which a
    CUDA host cannot run, so only 'basic' is saved. Off by default: measured on CPU it made
    runs no faster and session creation slower (docs/benchmarks.md), because the dynamo
    exporter already folds constants and every session optimises fully at load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def check_parity(
    onnx_path: Path,
    net: nn.Module,
    card: ModelCard,
    fp16: bool = False,
    shapes=PARITY_SHAPES,
    seed: int = 0,
) -> ParityReport:
    """onnxruntime against the fp32 PyTorch net, on random pixel images of `shapes` (N, H, W)
    fed as the card says; logits |delta| (logits output) and label agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_abs, agree, total, per_shape = 0.0, 0, 0, []
    net = net.float().eval()
    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    labels_out = card.output == "labels"
    for n, h, w in shapes:
        pixels = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
        x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.inference_mode():
            ref = net(x).numpy()
        feed = pixels.numpy() if card.takes_uint8 else x.numpy().astype(card.input_dtype)
        out = session.run(None, {card.input_name: feed})[0]
        if out.shape[:1] + out.shape[-2:] != (n, h, w):
            raise ParityError(f"onnxruntime returned shape {out.shape} for input {(n, h, w)}")
        ref_labels = ref.argmax(1)
        labels = out if labels_out else out.astype(np.float32).argmax(1)
        same = int((labels == ref_labels).sum())
        diff = None if labels_out else float(np.abs(out.astype(np.float32) - ref).max())
        if diff is not None:
            max_abs = max(max_abs, diff)
        agree += same
        total += ref_labels.size
        per_shape.append(
            {"shape": [n, h, w], "max_abs_diff": diff, "agreement": same / ref_labels.size}
        )
    return ParityReport(
        shapes=list(shapes),
        max_abs_diff=None if labels_out else max_abs,
        agreement=agree / total,
        threshold_max_abs=None if (labels_out or fp16) else FP32_MAX_ABS,
        threshold_agreement=FP16_MIN_AGREEMENT if fp16 else FP32_MIN_AGREEMENT,
        per_shape=per_shape,
    )


@dataclass
class ExportResult:
    path: Path
    card: ModelCard
    parity: ParityReport
    export_s: float
    file_bytes: int


def export_checkpoint(
    checkpoint: str | Path,
    repository: str | Path,
    name: str,
    version: int | None = None,
    fp16: bool = False,
    output: str = "labels",
    input: str = "uint8",
    force: bool = False,
    optimize: bool = False,
    parity_shapes=PARITY_SHAPES,
    log=print,
    scale: str = "native",
    tile_halo: int | None = None,
    fit_pixels: int = DEFAULT_FIT_PIXELS,
    int8: bool = False,
    int8_data: Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    held_out_images: int = DEFAULT_HELD_OUT_IMAGES,
) -> ExportResult:
    """Export a checkpoint into REPO/NAME/VERSION. `output`: labels | logits; `input`: uint8
    (NHWC pixels, normalised in the graph) | float (NCHW, normalised by the caller).
    `scale`: native (segserve's networks are fully convolutional and trained at the scale of
    their images: large images run in tiles with the architecture's measured halo) or fit
    (scaled to `fit_pixels` first). `int8`: also an int8 variant, calibrated on
    `int8_data` (default: the folder the checkpoint was trained on), published with the
    version only if it passes its gate."""
    if output not in ("labels", "logits") or input not in ("uint8", "float"):
        raise ValueError(
            f"output must be labels or logits, input uint8 or float ({output}, {input})"
        )
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    if output == "labels" and ckpt["num_classes"] > 256:
        raise ValueError(
            f"{ckpt['num_classes']} classes do not fit uint8 labels: use --output logits"
        )
    net = model_from_checkpoint(ckpt).eval()
    repository = Path(repository)
    version = next_version(repository, name) if version is None else int(version)
    card = model_card(
        ckpt,
        name,
        version,
        fp16,
        output == "labels",
        input == "uint8",
        scale,
        tile_halo,
        fit_pixels,
    )
    with publishing(repository, name, version, force) as folder:
        raw = folder / "raw.onnx"
        log(
            f"exporting {ckpt['architecture']} ({ckpt['num_classes']} classes) to ONNX opset {OPSET} ..."
        )
        onnx.save(variant_graph(convert_network(fold_batch_norm(net)), card), str(raw))
        if optimize:
            optimized = folder / "optimized.onnx"
            optimize_offline(raw, optimized)
            raw.unlink()
            raw = optimized
        log(f"parity against PyTorch on {len(parity_shapes)} shapes ...")
        report = check_parity(raw, net, card, fp16, parity_shapes)
        card = card.replace(parity=report.as_dict())  # the card carries its own parity figures
        if not report.passed:
            raise ParityError(
                f"parity failed, nothing published: max |delta logits| {report.max_abs_diff} "
                f"(limit {report.threshold_max_abs}), argmax agreement {report.agreement:.6%} "
                f"(limit {report.threshold_agreement:.2%})"
            )
        write_version(folder, checked_model(raw, card), card)
        raw.unlink()
        if int8:
            if card.precision != "float32":
                raise ValueError("--int8 is made from a float32 export: leave out --fp16")
            data = Path(int8_data or ckpt.get("trained_on", ""))
            quantize_folder(folder, data, calibration_images, held_out_images, log=log)
    path = version_dir(repository, name, version) / MODEL_FILE
    return ExportResult(path, card, report, time.perf_counter() - t0, path.stat().st_size)
