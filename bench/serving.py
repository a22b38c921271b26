"""A `segserve serve` process for a benchmark: started with some SEGSERVE_* variables, up
once /readyz answers, its /models detail at hand, stopped at the end of the block."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.compare import SEGSERVE, running


@dataclass
class Served:
    url: str
    pid: int
    ready_s: float

    def detail(self, model: str) -> dict:
        return httpx.get(f"{self.url}/models/{model}", timeout=30).json()


@contextmanager
def serving(repository: Path, env: dict[str, str], log: Path) -> Iterator[Served]:
    port = 18500 + os.getpid() % 500
    command = [*SEGSERVE, "--repository", str(repository)]
    env = {"SEGSERVE_REPOSITORY_POLL_S": "0", **env}
    t0 = time.perf_counter()  # loading a version and choosing its variant: minutes for FCN-8s
    with running(command, port, env, log, up="/readyz", timeout_s=1800) as proc:
        yield Served(f"http://127.0.0.1:{port}", proc.pid, time.perf_counter() - t0)
