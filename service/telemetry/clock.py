"""One request's clock: when it arrived, its deadline, and the seconds each stage took.

Every layer writes into the request's `Timings` (decode, the batcher's hooks, render); the
middleware turns it into the stage metrics, the `Server-Timing` header and the log line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum


class Stage(str, Enum):
    """The stages of a request, in order; the `stage` label of segserve_stage_duration_seconds."""

    DECODE = "decode"  # bytes to pixels
    PREPROCESS = "preprocess"  # pixels to the model's input, and stacking a batch
    QUEUE = "queue"  # waiting for the engine
    INFERENCE = "inference"  # session.run
    POSTPROCESS = "postprocess"  # labels back at the image's size, overlay, class counts
    ENCODE = "encode"  # the answer's bytes


# The stages a JSON answer reports (timings_ms), with "total".
JSON_STAGES = (Stage.DECODE, Stage.QUEUE, Stage.INFERENCE, Stage.POSTPROCESS)
TOTAL = "total"


class Timings:
    """One request's clock: when it arrived, its deadline, and the seconds each stage took.

    One clock (time.monotonic) for all of it. Stages measured in several pieces add up; a
    request of several images takes the longest queue wait of its images."""

    __slots__ = ("arrived", "deadline", "seconds", "spans", "trace", "notes")

    def __init__(self, timeout_s: float = float("inf"), arrived: float | None = None) -> None:
        self.arrived = time.monotonic() if arrived is None else arrived
        self.deadline = self.arrived + timeout_s
        self.seconds: dict[Stage, float] = {}
        # While the request is traced (telemetry/tracing.py): its stages as intervals, its
        # span, and what the pipeline notes about it (pixels, tiles). None: not traced.
        self.spans: list[tuple[str, float, float, dict]] | None = None
        self.trace = None
        self.notes: dict = {}

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            t1 = time.monotonic()
            self.add(stage, t1 - t0)
            if self.spans is not None:
                self.spans.append((stage.value, t0, t1, {}))

    def interval(self, stage: Stage, start: float, end: float, **attributes) -> None:
        """A stage measured elsewhere (the batcher's queue and run), for the trace."""
        if self.spans is not None:
            self.spans.append((stage.value, start, end, attributes))

    def note(self, **attributes) -> None:
        """Facts about the request for its trace (only kept while it is traced)."""
        if self.spans is not None:
            self.notes.update(attributes)

    def add(self, stage: Stage, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def longest(self, stage: Stage, seconds: float) -> None:
        self.seconds[stage] = max(self.seconds.get(stage, 0.0), seconds)

    def extend(self, seconds: float) -> None:
        """Move the deadline later (a large image, once its size is known)."""
        self.deadline += max(0.0, seconds)

    def elapsed(self) -> float:
        return time.monotonic() - self.arrived

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def milliseconds(self, stages: tuple[Stage, ...] = tuple(Stage)) -> dict[str, float]:
        """{stage: ms} of the stages measured, in stage order, and the total so far."""
        ms = {s.value: round(self.seconds[s] * 1000, 3) for s in stages if s in self.seconds}
        return {**ms, TOTAL: round(self.elapsed() * 1000, 3)}

    def server_timing(self) -> str:
        """The Server-Timing header (W3C): every stage measured, then the total."""
        return ", ".join(f"{k};dur={v:.2f}" for k, v in self.milliseconds().items())
