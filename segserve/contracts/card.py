"""The model card: what a served ONNX file says about itself.

One dataclass, one list of keys. `segserve export` and `segserve import` write it into the
ONNX file's metadata_props (strings: plain strings stay, everything else is JSON) and beside
it as model.json; the service reads it back. Nothing about classes, palette, input or output
is hard-coded anywhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from segserve.contracts.architectures import size_divisor, tile_halo
from segserve.contracts.palette import pil_palette
from segserve.errors import UserError

# The normalisation torchvision's ImageNet weights expect (RGB, 0..1 scale): what segserve
# trains with, and what an imported float model is assumed to take unless told otherwise.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The paper's four scores (section 5; docs/design.md), as a card's `metrics`, `segserve eval
# --json` and metrics.csv name them, and as tables print them.
SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
SCORE_LABELS = dict(zip(SCORES, ("pixel acc", "mean acc", "mean IU", "f.w. IU"), strict=True))

INPUT_DTYPES = ("uint8", "float32", "float16")
# The arithmetic inside a graph; one version may carry several variants of its network
# (contracts/repository.py: model.onnx and model.PRECISION.onnx beside it).
PRECISIONS = ("float32", "float16", "int8")
# How the network meets an image: "native" at the image's own resolution (in overlapping tiles
# once it is larger than one tile), or "fit": scaled down to `fit_pixels` first, for networks
# trained on photos at one scale. Cards written before either existed are "fit" (what the
# service did then).
SCALE_POLICIES = ("native", "fit")
DEFAULT_FIT_PIXELS = 1_000_000
INPUT_LAYOUTS = ("NHWC", "NCHW")
OUTPUTS = ("labels", "logits")
# The keys a card cannot do without; every other field has a default.
REQUIRED = (
    "name",
    "architecture",
    "num_classes",
    "class_names",
    "palette",
    "mean",
    "std",
    "output",
    "size_divisor",
)


class ModelCardError(UserError, ValueError):
    """Metadata that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]  # [r, g, b] per class
    mean: list[float]  # RGB, 0..1 scale; applied in the graph for uint8 inputs
    std: list[float]
    output: str  # "labels": uint8 [N, H, W] (argmax in the graph); "logits": [N, C, H, W]
    size_divisor: int  # the stride an input is padded to without changing what the net sees
    version: int = 1
    input_name: str = "image"
    # uint8 NHWC: raw RGB pixels, normalised in the graph (segserve export's default).
    # float32/float16 NCHW: pixels already normalised with mean/std (older exports, imports).
    input_dtype: str = "float32"
    input_layout: str = "NCHW"
    output_name: str = ""  # defaults to `output`
    precision: str = ""  # float32 or float16 inside the graph; defaults to a float input's dtype
    model_options: dict[str, Any] = field(default_factory=dict)
    trained_on: str = "unknown"
    metrics: dict[str, Any] = field(default_factory=dict)
    exported_at: str = ""
    producer: str = "segserve export"
    torch_version: str = ""
    opset: int | None = None
    parity: dict[str, Any] | None = None
    # How the weights came to be: commit, command, device and arithmetic, wall time (train).
    provenance: dict[str, Any] | None = None
    # The scale policy (SCALE_POLICIES) a request gets unless it asks for another of
    # `scale_policies`; fit's working size; the context each tile brings around what it keeps
    # (None: the architecture's measured halo); a tile side the network needs (None: the
    # server's, by provider).
    scale_policy: str = "fit"
    scale_policies: list[str] = field(default_factory=lambda: list(SCALE_POLICIES))
    fit_pixels: int = DEFAULT_FIT_PIXELS
    tile_halo: int | None = None
    tile_size: int | None = None
    # An int8 variant's making and its gate: method, calibration images, held-out agreement
    # with the float32 variant, mean and per-class IU of both (segserve.export.quantize).
    quantization: dict[str, Any] | None = None
    # A variant file's source: the sha256 of the model.onnx it was made from ("" in a
    # version's own model.onnx). A variant whose source is not the model.onnx beside it is
    # stale and never serves (service/runtime/selection.py).
    source_sha256: str = ""
    # The check-set gate's floor for this model: no class's IU may fall under it (None: the
    # server's setting, gate_class_floor).
    class_floor: float | None = None

    def __post_init__(self) -> None:
        if not self.output_name:
            object.__setattr__(self, "output_name", self.output)
        if not self.precision:
            float_input = self.input_dtype if self.input_dtype != "uint8" else "float32"
            object.__setattr__(self, "precision", float_input)
        if self.tile_halo is None:
            object.__setattr__(self, "tile_halo", tile_halo(self.architecture))
        problems = []
        if self.input_dtype not in INPUT_DTYPES:
            problems.append(f"input_dtype must be one of {INPUT_DTYPES}, not {self.input_dtype!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if (self.precision == "int8") != (self.quantization is not None):
            problems.append("an int8 card records its quantization (and only an int8 card does)")
        if self.input_layout not in INPUT_LAYOUTS:
            problems.append(f"input_layout must be NHWC or NCHW, not {self.input_layout!r}")
        if self.output not in OUTPUTS:
            problems.append(f"output must be labels or logits, not {self.output!r}")
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            problems.append(
                f"{len(self.class_names)} class_names for num_classes {self.num_classes}"
            )
        if len(self.palette) < self.num_classes or any(
            len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette
        ):
            problems.append("palette needs an [r, g, b] (0..255) for every class")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            problems.append("mean and std need three values (RGB), std positive")
        if self.size_divisor < 1:
            problems.append(f"size_divisor must be at least 1, not {self.size_divisor}")
        if self.output == "labels" and self.num_classes > 256:
            problems.append("a labels output is uint8: at most 256 classes")
        if not self.scale_policies or any(p not in SCALE_POLICIES for p in self.scale_policies):
            problems.append(f"scale_policies must name some of {SCALE_POLICIES}")
        elif self.scale_policy not in self.scale_policies:
            problems.append(
                f"scale_policy {self.scale_policy!r} is not one of {self.scale_policies}"
            )
        if self.fit_pixels < 1 or self.tile_halo < 0:
            problems.append("fit_pixels must be positive and tile_halo not negative")
        if self.tile_size is not None and self.tile_size <= 2 * self.tile_halo:
            problems.append(
                f"a {self.tile_size}-px tile keeps nothing with a {self.tile_halo}-px halo"
            )
        if problems:
            raise ModelCardError("model card: " + "; ".join(problems))

    # -- views -------------------------------------------------------------------------

    @property
    def takes_uint8(self) -> bool:
        return self.input_dtype == "uint8"

    @cached_property
    def palette_bytes(self) -> bytes:
        """The 768-byte PNG palette of this card's classes, built once per card."""
        return pil_palette(self.palette)

    @property
    def output_dtype(self) -> str:
        return "uint8" if self.output == "labels" else self.precision

    def class_id(self, key: str) -> int:
        """A class by name, or by its id written in ASCII digits."""
        if key in self.class_names:
            return self.class_names.index(key)
        if key.isascii() and key.isdigit() and int(key) < self.num_classes:
            return int(key)
        raise KeyError(key)

    def model_input(self, rgb: np.ndarray) -> np.ndarray:
        """One H x W x 3 uint8 image as the graph takes it (without the batch axis). uint8
        graphs: the pixels as they are (NHWC) or transposed (NCHW); float graphs:
        normalised here with the card's mean and std, C x H x W."""
        if self.takes_uint8:
            return (
                rgb if self.input_layout == "NHWC" else np.ascontiguousarray(rgb.transpose(2, 0, 1))
            )
        std = np.asarray(self.std, np.float32)
        scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        shift = (np.asarray(self.mean, np.float32) / std).reshape(3, 1, 1)
        chw = rgb.transpose(2, 0, 1) * scale - shift
        return chw.astype(self.input_dtype, copy=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> ModelCard:
        return ModelCard.from_dict({**self.as_dict(), **changes})

    # -- serialisation -----------------------------------------------------------------

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props are strings: str fields stay as they are, the rest is JSON."""
        return {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in self.as_dict().items()
            if v is not None
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], **export_fields: Any) -> ModelCard:
        """The card of the network a training checkpoint describes (training/checkpoint.py
        writes those fields); `export_fields` are the export's own: name, version, input,
        output, precision, ..."""
        n = ckpt["num_classes"]
        scores = ckpt.get("metrics") or {}
        metrics: dict[str, Any] = {k: scores.get(k) for k in SCORES}
        if scores.get("per_class_iu") is not None:
            metrics["per_class_iu"] = {
                name: None if math.isnan(iu) else iu
                for name, iu in zip(ckpt["class_names"], scores["per_class_iu"], strict=True)
            }
        return cls(
            architecture=ckpt["architecture"],
            model_options=ckpt["model_options"],
            num_classes=n,
            class_names=ckpt["class_names"],
            palette=ckpt["palette"][:n],
            mean=ckpt["mean"],
            std=ckpt["std"],
            size_divisor=size_divisor(ckpt["architecture"]),
            trained_on=ckpt.get("trained_on", "unknown"),
            metrics=metrics,
            provenance=ckpt.get("provenance"),
            **export_fields,
        )

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelCard:
        """Parse the string map onnxruntime returns (`custom_metadata_map`)."""
        text_fields = {f.name for f in fields(cls) if f.type == "str"}
        values: dict[str, Any] = {}
        for key, raw in props.items():
            if key in text_fields:
                values[key] = raw
                continue
            try:
                values[key] = json.loads(raw)
            except ValueError:
                values[key] = raw  # a foreign key of plain text: kept as text
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise ModelCardError(
                f"model card lacks {missing}: write one with `segserve export`, or bring a "
                "foreign ONNX in with `segserve import`"
            )
        values = _upgrade(dict(values))
        known = {f.name for f in fields(cls)}
        try:
            card = cls(
                name=str(values["name"]),
                architecture=str(values["architecture"]),
                num_classes=int(values["num_classes"]),
                class_names=[str(c) for c in values["class_names"]],
                palette=[[int(v) for v in c] for c in values["palette"]],
                mean=[float(v) for v in values["mean"]],
                std=[float(v) for v in values["std"]],
                output=str(values["output"]),
                size_divisor=int(values["size_divisor"]),
                **{k: values[k] for k in known - set(REQUIRED) if k in values},
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelCardError):
                raise
            raise ModelCardError(f"malformed model card: {exc}") from exc
        return card


def read_card(metadata: Mapping[str, str], beside: Path) -> ModelCard:
    """A served file's card: its own ONNX metadata (`metadata`), else the model.json at
    `beside` (so that a file from elsewhere can enter with a card written by hand)."""
    if "num_classes" not in metadata and beside.is_file():
        try:
            return ModelCard.from_dict(json.loads(beside.read_text()))
        except ValueError as exc:
            raise ModelCardError(
                f"{beside.name} beside the model is not a model card: {exc}"
            ) from exc
    if "num_classes" not in metadata:
        raise ModelCardError(
            "this ONNX file has no model card (its metadata and no model.json): bring it in with "
            "`segserve import MODEL.onnx --repository REPO --name NAME --classes voc|FILE.json`"
        )
    return ModelCard.from_metadata(dict(metadata))


def _upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Cards written before uint8 inputs said `input_layout: "NCHW float32"` and put the
    output's kind and name in one key; read them as the float NCHW models they are."""
    layout = values.get("input_layout")
    if isinstance(layout, str) and " " in layout:
        values["input_layout"], _, dtype = layout.partition(" ")
        values.setdefault("input_dtype", dtype)
    return values
