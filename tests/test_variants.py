"""The pure rules of which candidate serves (service/runtime/variants.py): the candidates a
version has on a host, another than its own only where clearly faster (fastest first),
alternating timed rounds of warm, unseen and batched work within a budget, and the check of
a candidate's labels against float32's. Timings here are made up: which candidate a CPU
makes fastest is its own business (test_selection.py runs them for real)."""

import numpy as np
import pytest

from segserve.service.runtime.variants import (
    CLEARLY_FASTER,
    HOPELESS,
    Work,
    candidates,
    challengers,
    check_labels,
    time_rounds,
)


def test_another_candidate_serves_only_where_it_is_clearly_faster_fastest_first():
    seconds = {"float32": 1.0, "int8": 0.5, "openvino-bf16": 0.3, "openvino-float32": 0.95}
    assert challengers(seconds, "float32") == ["openvino-bf16", "int8"]
    assert challengers({"float32": 1.0, "int8": 1 / CLEARLY_FASTER}, "float32") == ["int8"]
    assert challengers({"float32": 1.0, "int8": 0.95}, "float32") == []
    assert challengers({"float32": 1.0, "int8": 1.2}, "float32") == []


def names(cs):
    return [c.name for c in cs]


def test_the_candidates_of_a_version_depend_on_its_files_the_provider_and_openvino():
    files = ["int8", "float16"]
    assert names(candidates("float32", files, "cpu", None)) == ["float32", "int8"]
    assert names(candidates("float32", files, "cuda", None)) == ["float32", "float16"]
    assert names(candidates("float32", [], "cpu", None)) == ["float32"]
    # With OpenVINO on an AVX2 CPU: bf16 is listed (to be found unavailable), float16 not.
    avx2 = frozenset({"float32", "int8"})
    found = candidates("float32", ["int8"], "cpu", avx2)
    assert names(found) == [
        "float32", "int8", "openvino-float32", "openvino-bf16", "openvino-int8",
    ]  # fmt: skip
    assert [(c.runtime, c.file, c.arithmetic) for c in found[2:]] == [
        ("openvino", "float32", "float32"),
        ("openvino", "float32", "bf16"),
        ("openvino", "int8", "int8"),
    ]
    amx_fp16 = frozenset({"float32", "bf16", "float16", "int8"})
    assert "openvino-float16" in names(candidates("float32", [], "cpu", amx_fp16))
    assert names(candidates("float32", ["int8"], "cuda", avx2)) == [
        "float32"
    ]  # GPU: no CPU runtime
    # An imported float16 network is its own arithmetic: OpenVINO's are made from float32.
    assert names(candidates("float16", [], "cpu", avx2)) == ["float16"]
    assert [c.exact for c in found] == [True, False, True, False, False]


class FakeClock:
    """Each run advances time by its runner's next cost."""

    def __init__(self, costs):
        self.now, self.costs, self.order = 0.0, {k: iter(v) for k, v in costs.items()}, []

    def __call__(self):
        return self.now

    def runner(self, name):
        def run(images):
            self.order.append((name, len(images)))
            self.now += next(self.costs[name])

        return run


def test_rounds_alternate_the_median_round_counts_and_hopeless_ones_are_timed_once():
    work = Work(((8, 8),), None)  # per round: the warm shape, an unseen one
    clock = FakeClock({
        "own": [1, 1, 5, 1, 1, 1],  # a slow round of its own
        "fast": [1, 0, 1, 0, 1, 0],
        "slow": [2, 1] + [9] * 4,
    })  # fmt: skip
    timing = time_rounds(
        {n: clock.runner(n) for n in ("own", "fast", "slow")}, work, 3, "own", clock=clock
    )
    assert timing.seconds == {"own": 2.0, "fast": 1.0, "slow": 3.0}
    assert timing.dropped == {"slow": 1} and HOPELESS * 2.0 <= 3.0  # timed in round 1 only
    assert [n for n, _ in clock.order][:6] == ["own", "own", "fast", "fast", "slow", "slow"]
    assert timing.rounds == 3
    # The cost model's seeds: each warm run's fastest round (own's 5-s round is noise), never
    # an unseen shape's first call (fast's 0-s unseen runs are not among them).
    assert timing.runs == {"own": [(64, 1.0)], "fast": [(64, 1.0)], "slow": [(64, 2.0)]}


def test_a_round_that_would_take_the_timing_past_its_budget_is_not_started():
    work = Work(((8, 8),), None)
    clock = FakeClock({"own": [3] * 20, "other": [3] * 20})
    runners = {n: clock.runner(n) for n in ("own", "other")}
    timing = time_rounds(runners, work, 10, "own", budget_s=25, clock=clock)
    assert timing.rounds == 2  # 12 s a round: a third would end at 36 s
    once = time_rounds(runners, work, 10, "own", budget_s=1, clock=clock)
    assert once.rounds == 1  # one round always runs


def test_a_round_runs_each_warm_shape_a_new_unseen_shape_and_a_batch_the_batcher_would_form():
    shapes = [(512, 512), (375, 500)]
    work = Work.plan(shapes, max_batch=4, batch_pixels=799_999)
    assert work.batch == (3, (512, 512))  # three 512x512 fit under 0.8 MP, four do not
    first, second = work.runs(0), work.runs(1)
    assert [len(run.images) for run in first] == [1, 1, 1, 3]
    assert [run.warm for run in first] == [True, True, False, True]
    unseen = [run.images[0].shape[:2] for run in (first[2], second[2])]
    assert unseen[0] != unseen[1] and not set(unseen) & set(shapes)
    assert Work.plan([(1000, 1000)], 4, 799_999).batch is None  # two would not fit
    assert Work.plan([(64, 64)], 8, None).batch == (8, (64, 64))


def test_a_candidate_passes_its_check_only_with_float32_s_labels_its_score_and_its_floors():
    rng = np.random.default_rng(0)
    truth = [rng.integers(0, 3, (40, 50)) for _ in range(3)]
    reference = [t.copy() for t in truth]
    close = [r.copy() for r in reference]
    close[0][0, :5] = (close[0][0, :5] + 1) % 3  # 5 of 6000 pixels differ
    names = ["bg", "a", "b"]
    ok = check_labels(reference, close, truth, names, None, 0.995, 0.005)
    assert ok.passed and ok.agreement == pytest.approx(1 - 5 / 6000)
    assert "99.9167% of 6,000 check-set pixels keep float32's label" in ok.reason
    far = [np.where(r == 2, 1, r) for r in reference]  # never says b
    bad = check_labels(reference, far, truth, names, 0.5, 0.995, 0.005)
    assert not bad.passed and bad.low_classes == ["b 0.000"]
    assert bad.reason.startswith("failed its check on the check set: ")
    assert "keep float32's label (99.5% needed)" in bad.reason and "mean IU" in bad.reason
    assert bad.mean_iu < bad.reference_mean_iu == 1.0
