"""A `segserve serve` process for a benchmark: started with some SEGSERVE_* variables, up
once /readyz answers, its /models detail at hand, stopped at the end of the block."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from segserve import loadgen

ROOT = Path(__file__).resolve().parent.parent


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
    command = [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(repository),
               "--port", str(port)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "SEGSERVE_REPOSITORY_POLL_S": "0", **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        loadgen.wait_until_up(f"{url}/readyz", proc, 1800, log)
        yield Served(url, proc.pid, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(120)
