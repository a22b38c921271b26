"""The cost model and the batch plan it decides, with injected costs: no clocks, no models."""

from dataclasses import dataclass

import pytest

from segserve.service.batching.planning import (
    BatchLimits,
    CostModel,
    group_pixels,
    plan_next,
    predicted_backlog,
)


@dataclass
class J:
    size: tuple[int, int]
    enqueued: float


LIMITS = BatchLimits(max_batch_size=8, max_batch_pixels=10**9, size_divisor=16)
# A CPU: a fixed cost of 2 ms per run, 0.8 us per pixel (a 512x512 image: 210 ms).
CPU = CostModel(per_pixel=0.8e-6, fixed=0.002)
# A GPU: 1.5 ms per run, 5 ns per pixel (512x512: 2.8 ms).
GPU = CostModel(per_pixel=5e-9, fixed=0.0015)


def test_cost_model_recovers_a_line_from_runs():
    model = CostModel()
    for pixels in (1e5, 2e5, 4e5, 8e5):
        model.observe(pixels, 0.003 + 2e-7 * pixels)
    assert model.fixed == pytest.approx(0.003) and model.per_pixel == pytest.approx(2e-7)
    assert model.predict(1e6, runs=2) == pytest.approx(0.006 + 0.2)


def test_noisy_runs_of_nearby_sizes_do_not_predict_a_large_image_steeper_than_any_run():
    # Two sizes 0.05 MP apart, the larger one slowed by contention: a free line through
    # them has a slope of 4 s/MP and a negative intercept; every run's own rate is <= 1.2.
    model = CostModel()
    for pixels, seconds in [(200_000, 0.10), (250_000, 0.30), (200_000, 0.10), (250_000, 0.30)]:
        model.observe(pixels, seconds)
    rates = [0.10 / 200_000, 0.30 / 250_000]
    assert min(rates) <= model.per_pixel <= max(rates)
    assert model.fixed == 0.0
    assert model.predict(25_000_000) <= max(rates) * 25_000_000


def test_cost_model_with_one_size_keeps_its_fixed_prior():
    model = CostModel(per_pixel=1e-6, fixed=0.001)
    model.observe(1000, 0.011)
    assert model.fixed == 0.001 and model.per_pixel == pytest.approx(1e-5)


def test_on_a_cpu_different_sizes_run_apart():
    jobs = [J((480, 640), 0), J((500, 375), 1), J((512, 512), 2)]
    assert plan_next(jobs, LIMITS, CPU) == [jobs[0]]


def test_on_a_gpu_near_sizes_merge_because_the_fixed_cost_outweighs_the_padding():
    jobs = [J((480, 640), 0), J((500, 375), 1), J((512, 512), 2)]
    batch = plan_next(jobs, LIMITS, GPU)
    assert batch[0] is jobs[0] and len(batch) > 1
    sizes = [j.size for j in batch]
    apart = sum(GPU.predict(h * w) for h, w in sizes)
    assert GPU.predict(group_pixels(sizes, 16)) < apart


def test_merging_is_refused_exactly_when_padding_costs_more_than_a_run():
    head, other = J((512, 512), 0), J((512, 480), 1)  # 16384 pixels of padding
    padding_cost = 16384 * 1e-6
    pays = CostModel(per_pixel=1e-6, fixed=padding_cost * 1.01)
    loses = CostModel(per_pixel=1e-6, fixed=padding_cost * 0.99)
    assert plan_next([head, other], LIMITS, pays) == [head, other]
    assert plan_next([head, other], LIMITS, loses) == [head]


def test_the_oldest_jobs_group_runs_first_whatever_its_size():
    small_old = J((64, 64), 0)
    big_crowd = [J((512, 512), t) for t in (1, 2, 3, 4)]
    assert plan_next([*big_crowd, small_old], LIMITS, CPU) == [small_old]


def test_same_size_jobs_join_in_arrival_order_within_both_limits():
    jobs = [J((100, 100), t) for t in (5, 1, 3, 2, 4)]
    batch = plan_next(jobs, BatchLimits(3, 10**9, 16), CPU)
    assert [j.enqueued for j in batch] == [1, 2, 3]
    batch = plan_next(jobs, BatchLimits(8, 25_000, 16), CPU)
    assert len(batch) == 2  # 3 x 10,000 pixels would pass the batch pixel budget


def test_group_pixels_pads_only_mixed_sizes():
    assert group_pixels([(30, 30), (30, 30)], 16) == 1800
    assert group_pixels([(30, 30), (20, 40)], 16) == 2 * 32 * 48


def test_backlog_counts_what_runs_and_what_waits():
    assert predicted_backlog([], LIMITS, CPU, running_left=0.5) == 0.5
    backlog = predicted_backlog([100_000] * 9, LIMITS, CPU, running_left=0.1)
    assert backlog == pytest.approx(0.1 + 2 * 0.002 + 0.8e-6 * 900_000)


def test_joiners_come_only_from_the_oldest_max_batch_size_jobs():
    # Two old large jobs, then a run of small ones: a small head may take small joiners only
    # from the oldest four, never from behind the large jobs it would otherwise overtake.
    small = [J((100, 100), t) for t in (0, 3, 4, 5)]
    large = [J((480, 640), t) for t in (1, 2)]
    batch = plan_next([*small, *large], BatchLimits(4, 10**9, 16), CPU)
    assert [j.enqueued for j in batch] == [0, 3]
    assert plan_next([*small, *large], BatchLimits(8, 10**9, 16), CPU) == small
