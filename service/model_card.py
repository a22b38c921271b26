"""The model card: what an exported ONNX file says about itself in its metadata_props.

Nothing about classes, palette or normalisation is hard-coded in the service: it all
comes from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

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


class ModelCardError(ValueError):
    pass


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: int
    architecture: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    output: str  # "logits" or "labels"
    size_divisor: int
    input_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def numpy_input_dtype(self) -> type:
        return np.float16 if self.input_dtype == "float16" else np.float32

    def as_dict(self) -> dict[str, Any]:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **core}

    def class_id(self, key: str) -> int:
        """A class by name or by id given as text."""
        if key in self.class_names:
            return self.class_names.index(key)
        if key.isdigit() and int(key) < self.num_classes:
            return int(key)
        raise KeyError(key)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def card_from_metadata(props: dict[str, str]) -> ModelCard:
    """Parse the string metadata map onnxruntime returns (custom_metadata_map)."""
    values = {
        k: _maybe_json(v) if k not in ("name", "architecture", "trained_on", "exported_at") else v
        for k, v in props.items()
    }
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise ModelCardError(
            f"the ONNX file lacks model-card metadata {missing} (was it written by `segserve export`?)"
        )
    try:
        card = ModelCard(
            name=str(values["name"]),
            version=int(values.get("version", 1)),
            architecture=str(values["architecture"]),
            num_classes=int(values["num_classes"]),
            class_names=[str(c) for c in values["class_names"]],
            palette=[[int(v) for v in c] for c in values["palette"]],
            mean=[float(v) for v in values["mean"]],
            std=[float(v) for v in values["std"]],
            output=str(values["output"]),
            size_divisor=int(values["size_divisor"]),
            input_dtype=str(values.get("input_dtype", "float32")),
            extra={k: v for k, v in values.items() if k not in REQUIRED},
        )
    except (TypeError, ValueError) as exc:
        raise ModelCardError(f"malformed model-card metadata: {exc}") from exc
    if len(card.class_names) != card.num_classes or len(card.palette) < card.num_classes:
        raise ModelCardError("model card: class_names / palette do not match num_classes")
    if card.output not in ("logits", "labels"):
        raise ModelCardError(f"model card: output must be logits or labels, not {card.output!r}")
    return card


def read_card(session) -> ModelCard:
    return card_from_metadata(dict(session.get_modelmeta().custom_metadata_map))
