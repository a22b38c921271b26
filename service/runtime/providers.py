"""onnxruntime's execution providers: which to ask for, with what options, and the CUDA
libraries onnxruntime-gpu's wheels bring, loaded before a session needs them."""

from __future__ import annotations

import functools
import logging

import onnxruntime as ort

from segserve.errors import UserError

log = logging.getLogger("segserve.engine")

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ProviderUnavailable(UserError, RuntimeError):
    """An execution provider that was asked for by name did not load: a start-up error,
    never a silent fallback to a slower one."""


def choose_providers(setting: str, available: list[str]) -> tuple[list[str], bool]:
    """The providers to ask for and whether they are strict (named, not `auto`).

    `auto`: CUDA then CPU as onnxruntime offers them (TensorRT only when named).
    A list such as `cuda,cpu`: each must be available, and each must load.
    """
    if setting.strip().lower() == "auto":
        chosen = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        return chosen or ["CPUExecutionProvider"], False
    chosen = []
    for name in (n.strip().lower() for n in setting.split(",") if n.strip()):
        if name not in PROVIDER_NAMES:
            raise ValueError(
                f"unknown provider {name!r}: use auto or a list of {', '.join(PROVIDER_NAMES)}"
            )
        if PROVIDER_NAMES[name] not in available:
            raise ProviderUnavailable(
                f"provider {name} is not in this onnxruntime build ({', '.join(available)}); "
                "for CUDA install onnxruntime-gpu"
            )
        chosen.append(PROVIDER_NAMES[name])
    if not chosen:
        raise ValueError("providers: name at least one (auto, tensorrt, cuda, cpu)")
    return chosen, True


def provider_options(providers: list[str], cudnn_conv_algo_search: str) -> list[dict]:
    options: list[dict] = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            options.append({"cudnn_conv_algo_search": cudnn_conv_algo_search})
        elif p == "TensorrtExecutionProvider":
            options.append({"trt_engine_cache_enable": True})
        else:
            options.append({})
    return options


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's pip extras installed (the
    GPU image has no system CUDA). What cannot load shows when the session is made."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - reported, then the session creation decides
            log.warning("preloading the CUDA libraries failed: %s", exc)
