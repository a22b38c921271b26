"""Checkpoint -> ONNX with dynamic N, H, W, the model card as metadata, and a parity gate.

Nothing is published to the repository until onnxruntime reproduces PyTorch on several
odd sizes and a batch of two; a failing export leaves the repository as it was.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from segserve.contracts.architectures import size_divisor
from segserve.contracts.card import ModelCard
from segserve.contracts.repository import CARD_FILE, MODEL_FILE, next_version, version_dir
from segserve.training.checkpoint import load_checkpoint, model_from_checkpoint

OPSET = 18
TRACE_SHAPE = (1, 3, 64, 64)
# Odd sizes, sizes not divisible by 32, far from the trace size, and a batch of two.
PARITY_SHAPES = ((1, 3, 37, 53), (2, 3, 75, 101), (1, 3, 1, 1), (1, 3, 257, 191), (1, 3, 320, 480))
FP32_MAX_ABS = 1e-3
FP32_MIN_AGREEMENT = 0.9999
# fp16 rounds logits to ~3 significant digits, so near-ties between classes may flip: we
# require 99.5 % of pixels to keep their fp32 label (and report the figure).
FP16_MIN_AGREEMENT = 0.995


class ParityError(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the thresholds."""


class Segmenter(nn.Module):
    """What is exported: the network, ending in logits or (argmax variant) uint8 labels."""

    def __init__(self, net: nn.Module, argmax: bool) -> None:
        super().__init__()
        self.net = net
        self.argmax = argmax

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(image)
        if self.argmax:
            # One byte per pixel leaves the GPU instead of 4 * C.
            return logits.argmax(1).to(torch.uint8)
        return logits


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


def model_card(ckpt: dict, name: str, version: int, fp16: bool, argmax: bool) -> ModelCard:
    """The card of what is being exported: everything the service needs to know."""
    return ModelCard(
        name=name,
        version=version,
        architecture=ckpt["architecture"],
        model_options=ckpt["model_options"],
        num_classes=ckpt["num_classes"],
        class_names=ckpt["class_names"],
        palette=ckpt["palette"][: ckpt["num_classes"]],
        mean=ckpt["mean"],
        std=ckpt["std"],
        input_dtype="float16" if fp16 else "float32",
        input_layout="NCHW",
        output="labels" if argmax else "logits",
        size_divisor=size_divisor(ckpt["architecture"]),
        trained_on=ckpt.get("trained_on", "unknown"),
        metrics={
            k: ckpt.get("metrics", {}).get(k)
            for k in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
        },
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch_version=str(torch.__version__),
        opset=OPSET,
    )


def write_onnx(segmenter: nn.Module, path: Path, fp16: bool) -> None:
    """Export with the dynamo exporter; N, H and W stay symbolic (no size baked in)."""
    dtype = torch.float16 if fp16 else torch.float32
    example = torch.randn(*TRACE_SHAPE, dtype=dtype)
    program = torch.onnx.export(
        segmenter,
        (example,),
        input_names=["image"],
        output_names=["labels" if segmenter.argmax else "logits"],
        dynamic_shapes={"image": {0: "batch", 2: "height", 3: "width"}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))


def attach_metadata(path: Path, card: ModelCard) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in card.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"segserve {card.architecture} ({card.name} v{card.version})"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


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
    onnx_path: Path, net: nn.Module, fp16: bool, argmax: bool, shapes=PARITY_SHAPES, seed: int = 0
) -> ParityReport:
    """Run onnxruntime against the fp32 PyTorch net on `shapes`; logits |delta| and label agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_abs, agree, total, per_shape = 0.0, 0, 0, []
    net = net.float().eval()
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            ref = net(x).numpy()
        feed = x.numpy().astype(np.float16 if fp16 else np.float32)
        out = session.run(None, {"image": feed})[0]
        if out.shape[:1] + out.shape[-2:] != (shape[0], shape[2], shape[3]):
            raise ParityError(f"onnxruntime returned shape {out.shape} for input {shape}")
        ref_labels = ref.argmax(1)
        labels = out if argmax else out.astype(np.float32).argmax(1)
        same = int((labels == ref_labels).sum())
        diff = None if argmax else float(np.abs(out.astype(np.float32) - ref).max())
        if diff is not None:
            max_abs = max(max_abs, diff)
        agree += same
        total += ref_labels.size
        per_shape.append(
            {"shape": list(shape), "max_abs_diff": diff, "agreement": same / ref_labels.size}
        )
    return ParityReport(
        shapes=list(shapes),
        max_abs_diff=None if argmax else max_abs,
        agreement=agree / total,
        threshold_max_abs=None if (argmax or fp16) else FP32_MAX_ABS,
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
    argmax: bool = False,
    force: bool = False,
    optimize: bool = False,
    parity_shapes=PARITY_SHAPES,
    log=print,
) -> ExportResult:
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    net = model_from_checkpoint(ckpt).eval()
    repository = Path(repository)
    version = next_version(repository, name) if version is None else int(version)
    target = version_dir(repository, name, version)
    if target.exists() and not force:
        raise FileExistsError(
            f"{target} exists; pass --force to overwrite it or omit --version for a new one"
        )
    card = model_card(ckpt, name, version, fp16, argmax)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        raw, final = Path(tmp) / "raw.onnx", Path(tmp) / MODEL_FILE
        segmenter = Segmenter(net, argmax).eval()
        if fp16:
            segmenter = Segmenter(model_from_checkpoint(ckpt).half(), argmax).eval()
        log(
            f"exporting {ckpt['architecture']} ({ckpt['num_classes']} classes) to ONNX opset {OPSET} ..."
        )
        write_onnx(segmenter, raw, fp16)
        if optimize:
            optimize_offline(raw, final)
        else:
            shutil.copy(raw, final)
        attach_metadata(final, card)
        log(f"parity against PyTorch on {len(parity_shapes)} shapes ...")
        report = check_parity(final, net, fp16, argmax, parity_shapes)
        card = card.replace(parity=report.as_dict())
        if not report.passed:
            raise ParityError(
                f"parity failed, nothing published: max |delta logits| {report.max_abs_diff} "
                f"(limit {report.threshold_max_abs}), argmax agreement {report.agreement:.6%} "
                f"(limit {report.threshold_agreement:.2%})"
            )
        attach_metadata(final, card)  # the card now carries its own parity figures
        (Path(tmp) / CARD_FILE).write_text(card.to_json())
        raw.unlink()
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        # mkdtemp makes the folder private (0700); a server running as another user (the
        # images' uid 10001) must be able to read it.
        target.chmod(0o755)
        # TemporaryDirectory's cleanup must not fail on the moved folder.
        Path(tmp).mkdir()
    path = target / MODEL_FILE
    return ExportResult(path, card, report, time.perf_counter() - t0, path.stat().st_size)
