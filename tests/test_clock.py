"""One request's clock on its own: the stage names, its deadline, its stages and its total,
read against a clock the test moves (no wall-clock bound)."""

import pytest

from segserve.service.telemetry import clock
from segserve.service.telemetry.clock import JSON_STAGES, Stage, Timings


class Frozen:
    """time.monotonic as the test sets it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def frozen(monkeypatch) -> Frozen:
    time = Frozen(100.0)
    monkeypatch.setattr(clock, "time", time)
    return time


def test_the_stages_are_named_once_in_request_order():
    assert [s.value for s in Stage] == [
        "decode",
        "preprocess",
        "queue",
        "inference",
        "postprocess",
        "encode",
    ]
    assert set(JSON_STAGES) < set(Stage)


def test_a_request_has_one_clock_for_its_deadline_its_stages_and_its_total(frozen):
    timings = Timings(timeout_s=5.0, arrived=99.0)
    assert timings.deadline == 104.0
    assert (timings.left(), timings.elapsed()) == (4.0, 1.0)
    with timings.stage(Stage.DECODE):
        frozen.now += 0.125
    timings.add(Stage.INFERENCE, 0.25)
    timings.add(Stage.INFERENCE, 0.25)  # measured in two pieces: they add up
    timings.longest(Stage.QUEUE, 0.5)
    timings.longest(Stage.QUEUE, 0.1)  # several images: the longest wait counts
    ms = timings.milliseconds()
    assert ms == {"decode": 125.0, "queue": 500.0, "inference": 500.0, "total": 1125.0}
    assert timings.server_timing() == (
        "decode;dur=125.00, queue;dur=500.00, inference;dur=500.00, total;dur=1125.00"
    )
    frozen.now = 200.0
    assert timings.left() == 0.0  # past the deadline: nothing left, never negative
