"""A version's engine, chosen on this machine: every candidate runtime x arithmetic loaded,
warmed and timed, the clearly faster ones checked against the version's own labels on the
model's check set, the first that passes served (service/runtime/variants.py says what the
candidates are and how each is judged).

What may serve, whatever the timings say:
- the version's own model.onnx on onnxruntime (the reference every other is checked against);
- a variant file only if its card records the sha256 of the model.onnx beside it (a folder
  copied and given a new model.onnx keeps its old variants: they are stale, never run);
- an arithmetic other than float32 only after passing its check on the check set here
  (agreement, mean IU, class floors); without a check set, float32 arithmetic only;
- OpenVINO arithmetics only where this CPU computes them natively.

One function, `select_variant`, for the server, `segserve predict` and `segserve batch`,
so that all three serve what the same machine chose the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segserve.contracts.card import ModelCard, read_card
from segserve.contracts.repository import CARD_FILE, MODEL_FILE, file_sha256, variant_paths
from segserve.service.runtime import openvino
from segserve.service.runtime.engine import Engine
from segserve.service.runtime.gate import (
    CheckSet,
    CheckSetError,
    Scores,
    fits,
    load_check_set,
    scores_of,
)
from segserve.service.runtime.providers import ProviderUnavailable
from segserve.service.runtime.variants import (
    OPENVINO,
    REFUSED,
    SERVING,
    SKIPPED,
    SLOWER,
    STALE,
    UNAVAILABLE,
    Candidate,
    Check,
    Report,
    VariantChoice,
    Work,
    candidates,
    challengers,
    check_labels,
    not_clearly_faster,
    speed_reason,
    time_rounds,
)
from segserve.service.settings import Settings

log = logging.getLogger("segserve.variants")


class StaleVariant(ValueError):
    """A variant file that was not made from the model.onnx beside it."""


@dataclass
class Selection:
    engine: Engine  # what serves
    choice: VariantChoice
    runs: list[tuple[int, float]] = field(default_factory=list)  # its timed (pixels, s)
    scores: Scores | None = None  # its scores on `check` (the gate need not run it again)
    check: CheckSet | None = None


def openvino_arithmetics(settings: Settings, provider: str) -> frozenset[str] | None:
    """What OpenVINO computes natively here, or None where it is not a runtime to try: not
    a CPU host, not installed (`auto`), or not named in `runtimes`."""
    wanted = settings.runtime_names
    if provider != "cpu" or (wanted is not None and OPENVINO not in wanted):
        return None
    if not openvino.installed():
        if wanted is not None:  # named: a start-up error, never a silent fallback
            raise ProviderUnavailable(
                "runtimes names openvino, but OpenVINO is not installed: "
                "pip install 'segserve[openvino]'"
            )
        return None
    return openvino.cpu_arithmetics()


def read_variant_card(path: Path, source_sha256: str) -> ModelCard:
    """A variant file's own card (never the model.json beside it, which is model.onnx's),
    read without optimising or running the graph; StaleVariant unless it was made from the
    model.onnx whose sha256 is `source_sha256`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    meta = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    card = read_card(meta.get_modelmeta().custom_metadata_map, Path(path).with_suffix(".none"))
    if not card.source_sha256:
        raise StaleVariant(
            "stale: it does not record the model.onnx it was made from (made before segserve "
            "recorded it: make it again, e.g. segserve quantize --force)"
        )
    if card.source_sha256 != source_sha256:
        raise StaleVariant(
            f"stale: made from another model.onnx (sha256 {card.source_sha256[:12]}..., "
            f"this version's is {source_sha256[:12]}...)"
        )
    return card


def _cannot_serve(
    c: Candidate, check: CheckSet | None, why_unchecked: str, arithmetics: frozenset[str] | None
) -> tuple[str, str] | None:
    """Why a candidate is not even loaded: (verdict, reason), or None."""
    if c.runtime == OPENVINO and c.arithmetic not in (arithmetics or ()):
        known = ", ".join(sorted(arithmetics or ())) or "nothing"
        return UNAVAILABLE, (
            f"this CPU has no native {c.arithmetic} (OpenVINO's CPU plugin lists {known}): "
            "it would compute in f32"
        )
    if not c.exact and check is None:
        return REFUSED, f"{why_unchecked}: only float32 arithmetic may serve unchecked"
    return None


class _Loader:
    """Loads the candidates of one version; variant files' cards are read (and their source
    checked) once, whichever runtime runs them."""

    def __init__(
        self, model_path: Path, card_path: Path, files: dict[str, Path], s: Settings, own: Engine
    ):
        self.model_path, self.card_path, self.files, self.s, self.own = (
            model_path,
            card_path,
            files,
            s,
            own,
        )
        self.cards: dict[str, ModelCard] = {}
        self._sha: str | None = None

    def card(self, precision: str) -> ModelCard:
        if precision == self.own.variant:
            return self.own.card
        if precision not in self.cards:
            if self._sha is None:
                self._sha = file_sha256(self.model_path)
            self.cards[precision] = read_variant_card(self.files[precision], self._sha)
        return self.cards[precision]

    def load(self, c: Candidate) -> Engine:
        s = self.s
        card = self.card(c.file)  # StaleVariant for a variant of another model.onnx
        path = self.model_path if c.file == self.own.variant else self.files[c.file]
        if c.runtime == OPENVINO:
            return Engine.load_openvino(
                path,
                c.arithmetic,
                card,
                s.intra_op_threads,
                shape_cache=s.openvino_shape_cache,
                batch_pixels=s.arena_shrink_pixels,
            )
        return onnxruntime_engine(path, s, card=card)


def onnxruntime_engine(
    path: Path, s: Settings, card: ModelCard | None = None, card_path: Path | None = None
) -> Engine:
    """A file on onnxruntime with the settings' providers, threads and arena."""
    return Engine.load(
        path,
        s.providers,
        s.intra_op_threads,
        s.cudnn_conv_algo_search,
        cpu_arena=s.cpu_mem_arena,
        spinning=s.ort_spinning,
        card=card,
        arena_shrink_pixels=s.arena_shrink_pixels,
        card_path=card_path,
    )


def select_variant(
    model_path: Path,
    card_path: Path,
    files: dict[str, Path],
    s: Settings,
    check: CheckSet | None,
) -> Selection:
    """The engine that serves a version (model.onnx and its variant `files` by precision),
    and the choice with every candidate's report. Blocking: call in a worker thread."""
    # The version's own model.onnx on onnxruntime: what every other candidate is checked
    # against. A version whose own file does not load does not serve.
    own = onnxruntime_engine(model_path, s, card_path=card_path)
    own_name, provider, card = own.variant, own.provider, own.card
    why_unchecked = "no check set"
    if check is not None:
        try:
            fits(check, card.num_classes)
        except CheckSetError as exc:
            check, why_unchecked = None, f"the check set does not fit the model ({exc})"
    arithmetics = openvino_arithmetics(s, provider)
    every = candidates(own_name, list(files), provider, arithmetics)
    reports = {c.name: Report(c) for c in every}
    mode = s.variant
    if mode == "auto":
        wanted = every[1:]
    else:
        wanted = [c for c in every[1:] if c.name == mode]
        for c in every[1:]:
            if c.name != mode:
                reports[c.name].verdict = SKIPPED
                reports[c.name].reason = f"variant={mode} (the setting)"
    loader = _Loader(model_path, card_path, files, s, own)
    engines: dict[str, Engine] = {own_name: own}
    for c in wanted:
        report = reports[c.name]
        cannot = _cannot_serve(c, check, why_unchecked, arithmetics)
        if cannot is not None:
            report.verdict, report.reason = cannot
            continue
        try:
            engines[c.name] = loader.load(c)
        except StaleVariant as exc:
            report.verdict, report.reason = STALE, str(exc)
        except Exception as exc:  # a variant that does not load costs the version nothing
            report.verdict = REFUSED
            report.reason = f"does not load: {type(exc).__name__}: {exc}"
    shapes = list(dict.fromkeys(s.warmup))
    for name, engine in list(engines.items()):  # first runs allocate and pick kernels
        try:
            for h, w in shapes:
                engine.segment([np.zeros((h, w, 3), np.uint8)])
        except Exception as exc:
            if name == own_name:
                raise
            reports[name].verdict = REFUSED
            reports[name].reason = f"fails to run: {type(exc).__name__}: {exc}"
            del engines[name]

    # Timed: every loaded candidate under auto; under a forced variant only that one (its
    # runs seed the batcher's cost model), the version's own staying for the check.
    timed = engines if mode == "auto" else {n: e for n, e in engines.items() if n == mode}
    timed = timed or {own_name: own}
    work = Work.plan(shapes, s.batch_size_for(provider), own.batch_pixel_limit)
    t0 = time.perf_counter()
    timing = time_rounds(
        {n: e.segment for n, e in timed.items()},
        work,
        # Alone it is timed twice all the same: its runs seed the cost model (the fastest).
        s.variant_rounds if len(timed) > 1 else min(2, s.variant_rounds),
        own_name,
        s.variant_budget_s,
    )
    timing_s = time.perf_counter() - t0
    seconds = timing.seconds
    for name, took in seconds.items():
        reports[name].seconds = took
    for name in timing.dropped:
        reports[name].verdict = SLOWER
        reports[name].reason = not_clearly_faster(seconds, name, own_name) + " (timed once)"

    # Checked, fastest first, until one passes.
    t0 = time.perf_counter()
    checker = _Checker(check, engines[own_name], s)
    if mode == "auto":  # those timed once (hopeless in the first round) are not among them
        order = [n for n in challengers(seconds, own_name) if n not in timing.dropped]
    else:
        order = [n for n in timed if n != own_name]
    serving, passed_reason = own_name, ""
    for name in order:
        result = checker.run(name, engines[name])
        report = reports[name]
        if result is None or result.passed:
            serving = name
            passed_reason = (
                result.reason if result else f"unchecked: {why_unchecked}, float32 arithmetic"
            )
            if result:
                report.agreement, report.mean_iu = result.agreement, result.mean_iu
            break
        report.verdict, report.reason = REFUSED, result.reason
        report.agreement, report.mean_iu = result.agreement, result.mean_iu
    checking_s = time.perf_counter() - t0

    reports[serving].verdict = SERVING
    if serving != own_name:
        reports[serving].reason = passed_reason
    for name in engines:
        report = reports[name]
        if not report.verdict:
            report.verdict = SLOWER
            if name in seconds and serving in seconds:
                report.reason = (
                    f"{serving} is faster"
                    if name == own_name
                    or (serving != own_name and seconds[name] < seconds[own_name])
                    else not_clearly_faster(seconds, name, own_name)
                )
            else:
                report.reason = f"{serving} serves (the setting)"
    if checker.reference_scores is not None and reports[own_name].mean_iu is None:
        reports[own_name].mean_iu = checker.reference_scores.mean_iu
        reports[own_name].agreement = 1.0

    reason = _reason(mode, serving, own_name, seconds, reports, passed_reason)
    engine = engines[serving]
    scores = checker.scores.get(serving)
    runs = timing.runs.get(serving, [])
    engines.clear()  # the others' sessions (and their memory) go now
    choice = VariantChoice(
        serving,
        mode,
        reason,
        seconds,
        shapes,
        timing.rounds,
        sorted({own_name, *files}),
        [reports[c.name] for c in every],
        work.describe(),
        {"timing": timing_s, "checking": checking_s},
    )
    log.info("%s: %s", model_path, reason)
    return Selection(engine, choice, runs, scores, check)


def _reason(
    mode: str,
    serving: str,
    own: str,
    seconds: dict[str, float],
    reports: dict[str, Report],
    passed: str,
) -> str:
    refused = [
        f"{n} refused ({r.reason})"
        for n, r in reports.items()
        if r.verdict == REFUSED and r.agreement is not None
    ]
    if mode != "auto":
        if serving == mode:
            return f"variant={mode} (the setting)" + (f"; {passed}" if passed else "")
        why = reports[mode].reason if mode in reports else "no such candidate in this version"
        verdict = reports[mode].verdict if mode in reports else "absent"
        return f"variant={mode} (the setting) is {verdict}: {why}; serving its own {own}"
    if serving != own:
        return f"{speed_reason(seconds, serving, own)} (>= 1/1.10); {passed}"
    if refused:
        return f"{own} serves: " + "; ".join(refused)
    return speed_reason(seconds, own, own)


class _Checker:
    """The version's own labels on the check set (computed once, when a candidate is first
    checked), each candidate's against them, and the scores of each that ran."""

    def __init__(self, check: CheckSet | None, own: Engine, s: Settings) -> None:
        self.check, self.own, self.s = check, own, s
        self.reference: list[np.ndarray] | None = None
        self.reference_scores: Scores | None = None
        self.scores: dict[str, Scores] = {}

    def labels(self, engine: Engine) -> list[np.ndarray]:
        assert self.check is not None
        return [engine.segment([rgb])[0] for rgb in self.check.images]

    def run(self, name: str, engine: Engine) -> Check | None:
        """None where there is no check set (only float32 arithmetic gets this far)."""
        if self.check is None:
            return None
        card = self.own.card
        if self.reference is None:
            self.reference = self.labels(self.own)
            self.reference_scores = scores_of(self.reference, self.check, card.num_classes)
            self.scores[self.own.variant] = self.reference_scores
        labels = self.labels(engine)
        self.scores[name] = scores_of(labels, self.check, card.num_classes)
        floor = card.class_floor if card.class_floor is not None else self.s.gate_class_floor
        return check_labels(
            self.reference,
            labels,
            self.check.labels,
            card.class_names,
            floor,
            self.s.variant_min_agreement,
            self.s.variant_max_mean_iu_drop,
        )


def select_for_file(model: Path, s: Settings) -> Selection:
    """What `segserve predict` and `segserve batch` run MODEL with: as the server would
    serve it. A version's model.onnx brings its variant files and its model's check set
    (REPO/NAME/checkset) as the server finds them; any other ONNX file runs alone."""
    model = Path(model)
    in_version = model.name == MODEL_FILE
    check = None
    if in_version and s.variant != "float32":  # the version's own needs no check set
        try:
            check = load_check_set(model.parent.parent)
        except (OSError, ValueError) as exc:
            log.error("%s: its check set cannot be read (float32 only): %s", model, exc)
    files = variant_paths(model.parent) if in_version else {}
    return select_variant(model, model.with_name(CARD_FILE), files, s, check)
