"""INT8 variants: a version's network in 8-bit arithmetic, published beside its model.onnx
(model.int8.onnx) only where it agrees with the float32 network on held-out images.

onnxruntime's static quantization: QDQ format, uint8 activations (asymmetric), int8 weights
per output channel, MinMax ranges from calibration images the user names. Quantized:
Conv, ConvTranspose, Relu, MaxPool and Concat, so that the chain between convolutions stays
in int8; kept in float: the first convolution (it sees the normalised image) and the last
(the class scores, whose near-ties the argmax decides). Measured on the shipped U-Net
(docs/benchmarks.md, "INT8 variants"): only Conv and ConvTranspose quantized gave 98.5 % of
pixels unchanged and no speed-up; every op but the two ends 99.85 %.

The gate: at least 99.5 % of held-out pixels keep their float32 label, and, where the images
have labels, mean IU within 0.005 of float32's. The int8 file's own card records the method,
the calibration and held-out images and both variants' figures; a refused variant writes
nothing and says the figures.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segserve.contracts.agreement import MAX_MEAN_IU_DROP, MIN_AGREEMENT
from segserve.contracts.card import ModelCard, read_card
from segserve.contracts.repository import (
    CARD_FILE,
    MODEL_FILE,
    file_sha256,
    replace_file,
    set_card,
    variant_path,
    version_dir,
    versions_of,
)
from segserve.errors import UserError
from segserve.training.datasets import find_voc_root
from segserve.training.metrics import ConfusionMatrix, segmentation_scores

DEFAULT_CALIBRATION_IMAGES = 40
DEFAULT_HELD_OUT_IMAGES = 100
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Relu", "MaxPool", "Concat")
METHOD = (
    "onnxruntime static quantization, QDQ, uint8 activations (MinMax), int8 weights per "
    "channel; Conv/ConvTranspose/Relu/MaxPool/Concat, first and last convolution in float"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class QuantizationError(UserError):
    """A quantization that cannot be made (no images, no such version, a variant there)."""


class QuantizationRefused(UserError):
    """A quantization that was made and failed its gate: nothing was published."""

    def __init__(self, report: QuantizationReport) -> None:
        super().__init__(f"int8 variant refused, nothing published: {report.summary()}")
        self.report = report


@dataclass
class ImageSet:
    """Calibration images, and held-out images (with their labels where there are any)."""

    source: str
    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    labels: list[np.ndarray] | None  # one per held-out image, or None: agreement only


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_set(data: Path, calibration: int, held_out: int) -> ImageSet:
    """Images from `data`: a VOC-layout folder (calibration from its train split, held-out
    images and their labels from val) or a plain folder of images (by name: the first
    `calibration` to calibrate, the next `held_out` to compare, no labels)."""
    data = Path(data)
    if not data.is_dir():
        raise QuantizationError(f"calibration data not found: {data}")
    try:
        root = find_voc_root(data)
    except UserError:
        root = None
    if root is not None:
        split = root / "ImageSets" / "Segmentation"
        train = _ids(split / "train.txt")[:calibration]
        val = _ids(split / "val.txt")[:held_out]
        if not train or not val:
            raise QuantizationError(f"{root} needs images in both its train and val splits")
        return ImageSet(
            str(root),
            [_rgb(root / "JPEGImages" / f"{i}.jpg") for i in train],
            [_rgb(root / "JPEGImages" / f"{i}.jpg") for i in val],
            [np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in val],
        )
    files = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise QuantizationError(
            f"{data} holds {len(files)} images: name a folder of images (some to calibrate "
            "on, others to check the result) or a VOC-layout data folder"
        )
    calibration = min(calibration, len(files) - 1)  # at least one image held out
    chosen = files[calibration : calibration + held_out]
    return ImageSet(
        str(data), [_rgb(p) for p in files[:calibration]], [_rgb(p) for p in chosen], None
    )


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class QuantizationReport:
    method: str
    calibration: dict
    held_out: dict
    agreement: float
    mean_iu: dict[str, float] | None = None  # float32 and int8, where labels exist
    per_class_iu: dict[str, list[float | None]] | None = None
    thresholds: dict = field(
        default_factory=lambda: {"agreement": MIN_AGREEMENT, "mean_iu_drop": MAX_MEAN_IU_DROP}
    )

    @property
    def passed(self) -> bool:
        ok_iu = self.mean_iu is None or (
            self.mean_iu["float32"] - self.mean_iu["int8"] <= MAX_MEAN_IU_DROP
        )
        return self.agreement >= MIN_AGREEMENT and ok_iu

    def summary(self) -> str:
        text = (
            f"{self.agreement:.4%} of {self.held_out['pixels']:,} held-out pixels keep their "
            f"float32 label (at least {MIN_AGREEMENT:.1%} needed)"
        )
        if self.mean_iu is not None:
            text += (
                f"; mean IU {self.mean_iu['int8']:.4f} int8 vs {self.mean_iu['float32']:.4f} "
                f"float32 (at most {MAX_MEAN_IU_DROP} lower allowed)"
            )
        return text

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "calibration": self.calibration,
            "held_out": self.held_out,
            "agreement": self.agreement,
            "mean_iu": self.mean_iu,
            "per_class_iu": self.per_class_iu,
            "thresholds": self.thresholds,
            "passed": self.passed,
        }


class _Calibration:
    """onnxruntime's CalibrationDataReader over the images, one at a time."""

    def __init__(self, card: ModelCard, images: list[np.ndarray]) -> None:
        self.card, self.images = card, iter(images)

    def get_next(self) -> dict | None:
        rgb = next(self.images, None)
        return None if rgb is None else {self.card.input_name: self.card.model_input(rgb)[None]}


def _ends(path: Path) -> list[str]:
    """The first and the last convolution of a graph (ONNX nodes are in topological order)."""
    import onnx

    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type.startswith("Conv")]
    return sorted({convs[0], convs[-1]}) if convs else []


def quantize_file(src: Path, dst: Path, card: ModelCard, images: ImageSet) -> None:
    """The int8 graph of the float32 model at `src`, calibrated on `images.calibration`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="segserve-quantize-") as tmp:
        # Shape inference and folding, as onnxruntime asks; the symbolic pass cannot follow
        # a graph whose H and W stay unknown, so it is skipped (the ONNX one runs).
        ready = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(ready), skip_symbolic_shape=True)
        quantize_static(
            str(ready),
            str(dst),
            _Calibration(card, images.calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=_ends(ready),
        )


def gate(
    float_path: Path, int8_path: Path, card: ModelCard, images: ImageSet
) -> QuantizationReport:
    """Both variants on the held-out images: pixels that keep their label, and, with
    labels, mean and per-class IU of each."""
    import onnxruntime as ort

    def labels_of(session: ort.InferenceSession, rgb: np.ndarray) -> np.ndarray:
        out = session.run([card.output_name], {card.input_name: card.model_input(rgb)[None]})[0]
        return (out.argmax(1) if card.output == "logits" else out)[0]

    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in (("float32", float_path), ("int8", int8_path))
    }
    matrices = {name: ConfusionMatrix(card.num_classes) for name in sessions}
    same = total = 0
    for i, rgb in enumerate(images.held_out):
        ref, low = (labels_of(s, rgb) for s in sessions.values())
        same += int((ref == low).sum())
        total += ref.size
        if images.labels is not None:
            try:
                matrices["float32"].update(ref, images.labels[i])
                matrices["int8"].update(low, images.labels[i])
            except ValueError as exc:
                raise QuantizationError(
                    f"the labels in {images.source} do not fit this model's "
                    f"{card.num_classes} classes ({exc}): is it the model's own data?"
                ) from exc
    report = QuantizationReport(
        METHOD,
        {"images": len(images.calibration), "source": images.source},
        {"images": len(images.held_out), "pixels": total, "source": images.source},
        same / total,
    )
    if images.labels is not None:
        scores = {name: segmentation_scores(m.matrix) for name, m in matrices.items()}
        report.mean_iu = {name: float(s["mean_iu"]) for name, s in scores.items()}
        report.per_class_iu = {
            name: [None if np.isnan(v) else float(v) for v in s["per_class_iu"]]
            for name, s in scores.items()
        }
    return report


@dataclass
class QuantizeResult:
    path: Path
    card: ModelCard
    report: QuantizationReport
    file_bytes: int


def quantize_version(
    repository: Path,
    name: str,
    version: int | None,
    data: Path,
    calibration: int = DEFAULT_CALIBRATION_IMAGES,
    held_out: int = DEFAULT_HELD_OUT_IMAGES,
    force: bool = False,
    log=print,
) -> QuantizeResult:
    """REPO/NAME/VERSION/model.int8.onnx from its model.onnx, gated (QuantizationRefused,
    nothing written, when it fails). Newest version unless `version`."""
    versions = versions_of(Path(repository), name)
    if not versions:
        raise QuantizationError(f"no model {name!r} in {repository}")
    version = versions[-1] if version is None else version
    if version not in versions:
        raise QuantizationError(f"{name} has no version {version} (it has {versions})")
    folder = version_dir(Path(repository), name, version)
    return quantize_folder(folder, data, calibration, held_out, force, log)


def quantize_folder(
    folder: Path,
    data: Path,
    calibration: int = DEFAULT_CALIBRATION_IMAGES,
    held_out: int = DEFAULT_HELD_OUT_IMAGES,
    force: bool = False,
    log=print,
) -> QuantizeResult:
    """The int8 variant of the model.onnx in `folder` (a version, or one being exported)."""
    import onnx
    import onnxruntime as ort

    source, target = folder / MODEL_FILE, variant_path(folder, "int8")
    if target.exists() and not force:
        raise QuantizationError(f"{target} exists; pass --force to make it again")
    meta = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_modelmeta()
    card = read_card(meta.custom_metadata_map, folder / CARD_FILE)
    if card.precision != "float32":
        raise QuantizationError(f"{source} is {card.precision}: int8 is made from float32")
    source_sha256 = file_sha256(source)  # what the variant is made from, as it is now
    images = image_set(data, calibration, held_out)
    log(
        f"calibrating on {len(images.calibration)} images, checking on "
        f"{len(images.held_out)} held-out ones ({images.source}) ..."
    )
    with tempfile.TemporaryDirectory(prefix="segserve-int8-", dir=folder) as tmp:
        raw = Path(tmp) / "int8.onnx"
        quantize_file(source, raw, card, images)
        report = gate(source, raw, card, images)
        if not report.passed:
            raise QuantizationRefused(report)
        int8_card = card.replace(
            precision="int8", quantization=report.as_dict(), source_sha256=source_sha256
        )
        model = onnx.load(str(raw))
        set_card(model, int8_card)
        replace_file(target, model.SerializeToString())
    log(f"int8 variant: {report.summary()}")
    return QuantizeResult(target, int8_card, report, target.stat().st_size)
