"""One onnxruntime session per model version, and the choice of execution providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segserve.contracts.card import ModelCard
from segserve.service.imaging import labels_from_output

log = logging.getLogger("segserve.engine")

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def choose_providers(setting: str, available: list[str]) -> list[str]:
    """`auto`: CUDA then CPU as onnxruntime offers them (TensorRT only when named);
    or an explicit list such as `cuda,cpu`, which must all be available."""
    if setting.strip().lower() == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or [
            "CPUExecutionProvider"
        ]
    chosen = []
    for name in (n.strip().lower() for n in setting.split(",") if n.strip()):
        if name not in PROVIDER_NAMES:
            raise ValueError(
                f"unknown provider {name!r}: use auto or a list of {', '.join(PROVIDER_NAMES)}"
            )
        if PROVIDER_NAMES[name] not in available:
            raise ValueError(
                f"provider {name} is not available in this onnxruntime ({', '.join(available)})"
            )
        chosen.append(PROVIDER_NAMES[name])
    return chosen


def provider_options(providers: list[str], cudnn_conv_algo_search: str) -> list[dict]:
    options = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            options.append({"cudnn_conv_algo_search": cudnn_conv_algo_search})
        elif p == "TensorrtExecutionProvider":
            options.append({"trt_engine_cache_enable": True})
        else:
            options.append({})
    return options


@dataclass
class Engine:
    """A session plus its model card; `run` returns uint8 labels N x H x W."""

    session: ort.InferenceSession
    card: ModelCard
    path: Path

    @classmethod
    def load(
        cls,
        path: Path,
        providers_setting: str = "auto",
        intra_op_threads: int = 1,
        cudnn_conv_algo_search: str = "HEURISTIC",
    ) -> Engine:
        providers = choose_providers(providers_setting, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(path),
            opts,
            providers=providers,
            provider_options=provider_options(providers, cudnn_conv_algo_search),
        )
        return cls(
            session=session,
            card=ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map),
            path=Path(path),
        )

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0].replace("ExecutionProvider", "").lower()

    @property
    def output_name(self) -> str:
        return self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {"image": batch})[0]
        return labels_from_output(out)
