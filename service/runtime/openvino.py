"""OpenVINO as a second runtime on CPU hosts: the arithmetic onnxruntime's CPU kernels lack.

onnxruntime has no bfloat16 CPU kernels, and its int8 convolutions run on VNNI, never on a
CPU's matrix engine (AMX). OpenVINO's CPU plugin runs the same ONNX file in bf16 where the
CPU computes bf16 (AVX512-BF16, AMX), and a QDQ int8 file on AMX or VNNI where there is one.

Why the `openvino` runtime and not onnxruntime's OpenVINO execution provider (the plugin
`onnxruntime-ep-openvino`, which would keep one session API): the plugin offers its device
only where ONNX Runtime's hardware device has Intel's vendor id (ov_factory.cc, "Not an
Intel Device"), so on the AMD EPYCs this project also runs on it lists no device at all
(measured: `get_ep_devices()` lists the CPU EP only). OpenVINO itself runs on any x86 CPU.

Optional (`pip install segserve[openvino]`): without the package nothing here is imported,
and the service runs on onnxruntime alone.
"""

from __future__ import annotations

import functools
import queue
from pathlib import Path

import numpy as np

RUNTIME = "openvino"
# What OpenVINO computes a float32 file in, by the name segserve gives the arithmetic, and
# the CPU capability (OPTIMIZATION_CAPABILITIES) that says the CPU has it natively. Without
# it OpenVINO quietly computes in f32, so such a candidate would only pretend.
PRECISION_HINTS = {"float32": "f32", "bf16": "bf16", "float16": "f16"}
CAPABILITIES = {"float32": "FP32", "bf16": "BF16", "float16": "FP16", "int8": "INT8"}


@functools.cache
def _core():
    import openvino

    return openvino.Core()


def installed() -> bool:
    try:
        _core()
    except ImportError:
        return False
    return True


@functools.cache
def cpu_arithmetics() -> frozenset[str]:
    """The arithmetics OpenVINO's CPU plugin computes natively on this CPU (float32, bf16,
    float16, int8), from the CPU's OPTIMIZATION_CAPABILITIES; empty without OpenVINO."""
    if not installed():
        return frozenset()
    capabilities = set(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return frozenset(name for name, cap in CAPABILITIES.items() if cap in capabilities)


class OpenVinoRunner:
    """One ONNX file compiled by OpenVINO's CPU plugin, run like an onnxruntime session by
    the engine: names in, arrays out. Infer requests are pooled: the batcher runs one batch
    at a time, the gate and the shadow may run another beside it."""

    runtime = RUNTIME
    provider = "cpu"

    def __init__(self, path: Path, arithmetic: str, threads: int, shape_cache: int) -> None:
        hint = PRECISION_HINTS.get(arithmetic, "f32")  # an int8 file: its QDQ decides
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": hint,
            # Kernels compiled per input shape are cached; every new image size adds about
            # 2 MB (measured: +150 MB over 60 sizes). A service sees endless sizes, so the
            # cache is bounded: the warm-up and tile shapes recur, the rest are one-offs.
            "CPU_RUNTIME_CACHE_CAPACITY": shape_cache,
        }
        self.compiled = _core().compile_model(str(path), "CPU", config)
        self.arithmetic = arithmetic
        # What the plugin will compute in ("f32", "bf16", "f16"): the hint where the CPU
        # has it, f32 where it does not.
        self.computes_in = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.inputs = [p.get_any_name() for p in self.compiled.inputs]
        self.outputs = [p.get_any_name() for p in self.compiled.outputs]
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, output: str, input_name: str, batch: np.ndarray, shrink: bool) -> np.ndarray:
        """One inference; `shrink` is onnxruntime's arena's business: OpenVINO keeps the
        memory of its largest run with the compiled model (bounded by the batch pixel
        limit and the tile, as onnxruntime's arena is)."""
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            return request.infer({input_name: batch})[output]
        finally:
            self._requests.put(request)
