"""Which runtime and arithmetic serve a version: the candidates a version has on this host,
how they are timed, and what each one's verdict is. Pure: the loading, running and scoring
are service/runtime/selection.py's.

A version carries its network as model.onnx (float32, its "own" arithmetic) and may carry
variant files beside it (model.int8.onnx, contracts/repository.py). A candidate is a file
run by a runtime in an arithmetic:

    float32            model.onnx on onnxruntime (the version's own: the reference)
    int8               model.int8.onnx on onnxruntime's CPU kernels (VNNI where there is)
    float16            model.float16.onnx on CUDA / TensorRT
    openvino-float32   model.onnx on OpenVINO's CPU plugin, in f32
    openvino-bf16      model.onnx on OpenVINO in bf16 (AVX512-BF16, AMX)
    openvino-float16   model.onnx on OpenVINO in f16 (CPUs with AMX-FP16)
    openvino-int8      model.int8.onnx on OpenVINO (AMX, VNNI)

Which wins depends on the CPU (docs/benchmarks.md, "Runtimes and arithmetics"): on an AMX
Xeon OpenVINO's bf16 and int8 are several times float32, on an AVX2-only EPYC they gain
10-50 %. So nothing is guessed from CPU flags: the candidates are timed here, another than
the version's own serves only where it is clearly faster, and only after it was checked
against the version's own labels on the model's check set on this machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from segserve.training.metrics import ConfusionMatrix, segmentation_scores

ONNXRUNTIME, OPENVINO = "onnxruntime", "openvino"
OPENVINO_ARITHMETICS = ("float32", "bf16", "float16", "int8")
VARIANT_NAMES = (
    "float32",
    "float16",
    "int8",
    *(f"openvino-{a}" for a in OPENVINO_ARITHMETICS),
)
# Another candidate serves only when it takes at most 1/1.10 of the version's own time:
# below that, a difference is within what two runs of the same session differ by on a busy
# CPU, and the version's own arithmetic is the one its quality figures are for.
CLEARLY_FASTER = 1.10
# After the first timed round, a candidate this much slower than the version's own is not
# timed again: it cannot come within CLEARLY_FASTER of winning (the load's time is bounded).
HOPELESS = 1.25
# The variant files worth timing on onnxruntime, by provider. INT8 (QDQ) runs on its CPU
# kernels; CUDA's would fall back to float for most of it. float16 pays on GPUs (tensor
# cores); on a CPU onnxruntime converts it back to float32 around most kernels.
ON_PROVIDER = {"cpu": ("int8",), "cuda": ("float16",), "tensorrt": ("float16",)}

# The verdicts /models/{name} gives each candidate.
SERVING = "serving"  # answers the version's requests
SLOWER = "slower"  # timed: not clearly faster than what serves
REFUSED = "refused"  # failed its check, did not load or run, or may not serve unchecked
STALE = "stale"  # a variant file made from another model.onnx: never loaded
UNAVAILABLE = "unavailable"  # this CPU lacks the arithmetic
SKIPPED = "skipped"  # not loaded: another variant was named by the setting


@dataclass(frozen=True)
class Candidate:
    name: str  # "float32", "int8", "openvino-bf16", ...
    runtime: str  # onnxruntime | openvino
    file: str  # the precision of the file it runs: the version's own or a variant's
    arithmetic: str  # what it computes in

    @property
    def exact(self) -> bool:
        """float32 arithmetic: the version's own numbers, up to the order of the sums."""
        return self.arithmetic == "float32"


def candidates(
    own: str, files: Sequence[str], provider: str, openvino: frozenset[str] | None
) -> list[Candidate]:
    """Every candidate of a version on this host, the version's own first. `files`: the
    precisions of its variant files; `openvino`: the arithmetics OpenVINO computes natively
    on this CPU (None: OpenVINO not installed or not asked for). bf16 is listed wherever
    OpenVINO is (as unavailable where the CPU lacks it: that is worth knowing), float16
    only where the CPU has it."""
    out = [Candidate(own, ONNXRUNTIME, own, own)]
    out += [Candidate(p, ONNXRUNTIME, p, p) for p in ON_PROVIDER.get(provider, ()) if p in files]
    if provider == "cpu" and openvino is not None and own == "float32":
        for arithmetic in ("float32", "bf16", "float16"):
            if arithmetic != "float16" or arithmetic in openvino:
                out.append(Candidate(f"openvino-{arithmetic}", OPENVINO, own, arithmetic))
        if "int8" in files:
            out.append(Candidate("openvino-int8", OPENVINO, "int8", "int8"))
    return [c for i, c in enumerate(out) if c.name not in {d.name for d in out[:i]}]


@dataclass
class Report:
    """One candidate as /models/{name} shows it: its verdict and the figures behind it."""

    candidate: Candidate
    verdict: str = ""
    reason: str = ""
    seconds: float | None = None  # median over rounds of one round's work
    agreement: float | None = None  # share of check-set pixels with float32's label
    mean_iu: float | None = None  # on the check set

    def as_dict(self, own_seconds: float | None) -> dict:
        c = self.candidate
        speedup = round(own_seconds / self.seconds, 3) if own_seconds and self.seconds else None
        return {
            "name": c.name,
            "runtime": c.runtime,
            "arithmetic": c.arithmetic,
            "file": "model.onnx" if c.file == "float32" else f"model.{c.file}.onnx",
            "verdict": self.verdict,
            "reason": self.reason,
            "seconds": None if self.seconds is None else round(self.seconds, 6),
            "speedup": speedup,
            "agreement": self.agreement,
            "mean_iu": self.mean_iu,
        }


@dataclass(frozen=True)
class VariantChoice:
    """What serves and why: the candidate, how it was chosen (`auto` or the forced setting),
    a reason a person can read, and every candidate's report."""

    variant: str
    mode: str
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    rounds: int = 0
    available: list[str] = field(default_factory=list)  # the variant files the version has
    reports: list[Report] = field(default_factory=list)
    work: list[str] = field(default_factory=list)  # what one timed round ran
    load_seconds: dict[str, float] = field(default_factory=dict)  # timing, checking

    def as_dict(self) -> dict:
        own = self.seconds.get(self.reports[0].candidate.name) if self.reports else None
        return {
            "variant": self.variant,
            "mode": self.mode,
            "reason": self.reason,
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "shapes": [f"{h}x{w}" for h, w in self.shapes],
            "rounds": self.rounds,
            "threshold": CLEARLY_FASTER,
            "round": self.work,
            "load_seconds": {k: round(v, 3) for k, v in self.load_seconds.items()},
            "candidates": [r.as_dict(own) for r in self.reports],
        }


def challengers(seconds: dict[str, float], own: str, threshold: float = CLEARLY_FASTER) -> list:
    """The candidates clearly faster than the version's own (at most 1/threshold of its
    time), fastest first: the order they are checked in until one passes. Pure."""
    faster = [n for n, s in seconds.items() if n != own and s * threshold <= seconds[own]]
    return sorted(faster, key=seconds.__getitem__)


def speed_reason(seconds: dict[str, float], name: str, own: str) -> str:
    if name == own:
        return f"{own} was fastest" if min(seconds, key=seconds.__getitem__) == own else own
    return f"{name} took 1/{seconds[own] / seconds[name]:.2f} of {own}'s time"


def not_clearly_faster(seconds: dict[str, float], name: str, own: str) -> str:
    speedup = seconds[own] / seconds[name]
    if speedup < 1:
        return f"took {1 / speedup:.2f}x {own}'s time"
    return f"took 1/{speedup:.2f} of {own}'s time, under the 1/{CLEARLY_FASTER:.2f} that would make it worth serving"


# -- what one timed round runs -----------------------------------------------------------


class Run(NamedTuple):
    label: str
    images: list[np.ndarray]
    warm: bool = True  # a shape the runner has run before (the unseen one is not)


@dataclass(frozen=True)
class Work:
    """One timed round: each warm-up shape alone, a shape no candidate has seen (a runtime
    that compiles per shape pays it here, every round anew), and a batch as the batcher forms
    them (several images of one warm-up shape)."""

    shapes: tuple[tuple[int, int], ...]
    batch: tuple[int, tuple[int, int]] | None  # (images, shape)

    @classmethod
    def plan(
        cls, shapes: Sequence[tuple[int, int]], max_batch: int, batch_pixels: int | None
    ) -> Work:
        """The batch: the largest warm-up shape of which at least two fit the batch pixel
        bound, as many as fit (at most `max_batch`)."""
        batch = None
        for h, w in sorted(shapes, key=lambda s: s[0] * s[1], reverse=True):
            n = min(max_batch, (batch_pixels or max_batch * h * w) // (h * w))
            if n >= 2:
                batch = (n, (h, w))
                break
        return cls(tuple(shapes), batch)

    def unseen(self, round_: int) -> tuple[int, int]:
        """A shape none of the warm-up shapes is, new in every round."""
        h, w = self.shapes[0]
        shape = (h + 10 + 6 * round_, w + 14 + 6 * round_)
        while shape in self.shapes:
            shape = (shape[0] + 1, shape[1])
        return shape

    def runs(self, round_: int) -> list[Run]:
        runs = [Run(f"{h}x{w}", [np.zeros((h, w, 3), np.uint8)]) for h, w in self.shapes]
        h, w = self.unseen(round_)
        runs.append(Run(f"{h}x{w} (unseen)", [np.zeros((h, w, 3), np.uint8)], warm=False))
        if self.batch is not None:
            n, (h, w) = self.batch
            runs.append(Run(f"{n} x {h}x{w}", [np.zeros((h, w, 3), np.uint8)] * n))
        return runs

    def describe(self) -> list[str]:
        return [run.label for run in self.runs(0)]


@dataclass
class Timing:
    seconds: dict[str, float]  # median over the rounds each candidate ran
    # (pixels, seconds) of each warm run, the fastest of its rounds: the batcher's cost model
    # starts from them. The fastest, as a host's noise only ever adds time (single runs on a
    # shared 2-core host came out up to 1.4x slow, and a fresh server predicted a 40 MP image
    # that takes 64-71 s at 116 s and refused it); not the unseen shape's, whose first call's
    # cost, paid once per shape, is no rate of work.
    runs: dict[str, list[tuple[int, float]]]
    rounds: int
    dropped: dict[str, int] = field(default_factory=dict)  # timed no more after round N


def time_rounds(
    runners: dict[str, Callable[[list[np.ndarray]], object]],
    work: Work,
    rounds: int,
    own: str,
    budget_s: float = float("inf"),
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Each runner (warm already) on a round's work, in alternating rounds (what the machine
    does meanwhile falls on all alike). After the first round, runners HOPELESS times slower
    than `own` are timed no more; a round that would take the total past `budget_s` is not
    started (one round always runs)."""
    totals: dict[str, list[float]] = {name: [] for name in runners}
    fastest: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in runners}
    active = list(runners)
    dropped: dict[str, int] = {}
    started, done = clock(), 0
    for round_ in range(rounds):
        elapsed = clock() - started
        if done and elapsed + elapsed / done > budget_s:  # another round of the same cost
            break
        inputs = work.runs(round_)
        for name in active:
            total = 0.0
            for run in inputs:
                t0 = clock()
                runners[name](run.images)
                took = clock() - t0
                total += took
                best = fastest[name].get(run.label)
                if run.warm and (best is None or took < best[1]):
                    pixels = sum(im.shape[0] * im.shape[1] for im in run.images)
                    fastest[name][run.label] = (pixels, took)
            totals[name].append(total)
        done += 1
        if done == 1 and own in active:
            for name in [n for n in active if n != own]:
                if totals[name][0] >= HOPELESS * totals[own][0]:
                    active.remove(name)
                    dropped[name] = 1
    seconds = {name: statistics.median(t) for name, t in totals.items() if t}
    runs = {name: list(by_label.values()) for name, by_label in fastest.items()}
    return Timing(seconds, runs, done, dropped)


# -- the check on the check set ----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    agreement: float
    mean_iu: float
    reference_mean_iu: float
    low_classes: list[str]
    passed: bool
    reason: str


def check_labels(
    reference: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    class_names: list[str],
    class_floor: float | None,
    min_agreement: float,
    max_mean_iu_drop: float,
) -> Check:
    """A candidate's labels on the check set against the version's own (`reference`) and
    the truth: pixels that keep their label, mean IU of each, classes under the floor."""
    same = sum(int((a == b).sum()) for a, b in zip(reference, labels, strict=True))
    total = sum(a.size for a in reference)
    agreement = same / max(total, 1)
    ious = []
    for predicted in (reference, labels):
        matrix = ConfusionMatrix(len(class_names))
        for p, t in zip(predicted, truth, strict=True):
            matrix.update(p, t)
        scores = segmentation_scores(matrix.matrix)
        ious.append((scores["mean_iu"], scores["per_class_iu"]))
    (ref_iu, _), (mean_iu, per_class) = ious
    ref_iu, mean_iu = (0.0 if np.isnan(v) else float(v) for v in (ref_iu, mean_iu))
    low = []
    if class_floor is not None:
        low = [
            f"{name} {iu:.3f}"
            for name, iu in zip(class_names, per_class, strict=True)
            if not np.isnan(iu) and iu < class_floor
        ]
    problems = []
    if agreement < min_agreement:
        problems.append(
            f"{agreement:.4%} of pixels keep float32's label ({min_agreement:.1%} needed)"
        )
    if mean_iu < ref_iu - max_mean_iu_drop:
        problems.append(
            f"mean IU {mean_iu:.4f} against float32's {ref_iu:.4f} (at most {max_mean_iu_drop} lower)"
        )
    if low:
        problems.append(f"classes under the floor of {class_floor}: {', '.join(low)}")
    if problems:
        reason = "failed its check on the check set: " + "; ".join(problems)
    else:
        reason = (
            f"checked: {agreement:.4%} of {total:,} check-set pixels keep float32's label, "
            f"mean IU {mean_iu:.4f} (float32 {ref_iu:.4f})"
        )
    return Check(agreement, mean_iu, ref_iu, low, not problems, reason)
