"""Which variant of a version serves: the arithmetic this machine runs fastest, found by
measuring it here.

A version may carry its network in several arithmetics (model.onnx and model.PRECISION.onnx
beside it, contracts/repository.py). Whether INT8 pays depends on the CPU: about 2x where it
has VNNI, a loss on some CPUs without (docs/benchmarks.md, "INT8 variants"). So the server
does not guess from CPU flags: at load it times every variant it may serve on the warm-up
shapes, in alternating rounds, and serves another variant than the version's own only where
it is clearly faster. `variant` (a setting) forces one instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VARIANT_MODES = ("auto", "float32", "float16", "int8")
# Another variant serves only when it takes at most 1/1.10 of the version's own time: below
# that, a difference is within what two runs of the same session differ by on a busy CPU,
# and the version's own arithmetic is the one its quality figures are for.
CLEARLY_FASTER = 1.10
# The variants worth timing on each provider. INT8 (QDQ) runs on onnxruntime's CPU kernels;
# CUDA's would fall back to float for most of it. float16 pays on GPUs (tensor cores); on a
# CPU onnxruntime converts it back to float32 around most kernels.
ON_PROVIDER = {"cpu": ("int8",), "cuda": ("float16",), "tensorrt": ("float16",)}


@dataclass(frozen=True)
class VariantChoice:
    """What serves and why: the variant (a precision), how it was chosen (`auto` or the
    forced setting), the median seconds of each variant timed over the shapes, and a reason
    a person can read."""

    variant: str
    mode: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    rounds: int = 0
    available: list[str] = field(default_factory=list)  # the variants the version has

    def as_dict(self) -> dict:
        return {
            "variant": self.variant,
            "mode": self.mode,
            "reason": self.reason,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "shapes": [f"{h}x{w}" for h, w in self.shapes],
            "rounds": self.rounds,
            "threshold": CLEARLY_FASTER,
        }


def candidates(
    own: str, files: dict[str, Path], provider: str, mode: str
) -> tuple[list[str], str | None]:
    """The variants to load besides the version's own (`own`, its model.onnx's precision),
    given the variant files there are, and, when the forced `mode` cannot be had, why."""
    if mode == "auto":
        return [p for p in ON_PROVIDER.get(provider, ()) if p in files and p != own], None
    if mode == own:
        return [], None
    if mode in files:
        return [mode], None
    return [], f"no {mode} variant in this version: serving its own {own}"


def choose(
    seconds: dict[str, float], own: str, threshold: float = CLEARLY_FASTER
) -> tuple[str, str]:
    """The variant to serve from measured seconds (lower is faster), and why: the fastest,
    if it beats the version's own by `threshold`, else the version's own. Pure."""
    fastest = min(seconds, key=seconds.__getitem__)
    if fastest == own:
        return own, f"{own} was fastest"
    speedup = seconds[own] / seconds[fastest]
    if speedup >= threshold:
        return fastest, f"{fastest} took 1/{speedup:.2f} of {own}'s time (>= 1/{threshold:.2f})"
    return own, (
        f"{fastest} took 1/{speedup:.2f} of {own}'s time, under the 1/{threshold:.2f} that "
        f"would make it worth serving instead"
    )


def time_rounds(
    runners: dict[str, Callable[[np.ndarray], object]],
    shapes: Sequence[tuple[int, int]],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """Each runner on a zero image of every shape, in `rounds` alternating rounds (so that
    what the machine does meanwhile falls on all of them alike). Returns the median over
    rounds of each runner's seconds for all shapes, and each runner's (pixels, seconds) of
    every timed run (what a cost model learns from). The runners are warm already."""
    images = [np.zeros((h, w, 3), np.uint8) for h, w in shapes]
    totals: dict[str, list[float]] = {name: [] for name in runners}
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            total = 0.0
            for image in images:
                t0 = clock()
                run(image)
                took = clock() - t0
                total += took
                runs[name].append((image.shape[0] * image.shape[1], took))
            totals[name].append(total)
    return {name: statistics.median(t) for name, t in totals.items()}, runs
