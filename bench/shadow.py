"""What shadow traffic costs the served answers (docs/benchmarks.md, "Shadow traffic"): the
shipped model served by `segserve serve`, version 1 serving and an unchanged copy as
version 2 on shadow trial (never promoted: its trial asks for more requests than the run
sends), against the same server with shadowing off, rounds alternating:

    python -m bench.shadow [--fraction 0.1] [--rounds 2] [--duration 30] [--out docs/bench]

Load: `segserve bench --concurrency 8` on mixed sizes (256x256, 375x500, 512x512, 768x1024).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from segserve.default_model import NAME, install
from segserve.loadgen import wait_until_up
from segserve.training.provenance import cpu_name

SIZES = "256x256,375x500,512x512,768x1024"


def serve(repo: Path, port: int, fraction: float, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SEGSERVE_REPOSITORY_POLL_S": "1",
        "SEGSERVE_SHADOW_FRACTION": str(fraction),
        "SEGSERVE_SHADOW_MIN_REQUESTS": "1000000",
    }
    cmd = [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(repo)]
    return subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def one_run(fraction: float, duration: float, tmp: Path, tag: str) -> dict:
    repo = tmp / f"repo-{tag}"
    shutil.rmtree(repo, ignore_errors=True)
    install(repo)
    port = 18700 + os.getpid() % 200
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"server-{tag}.log"
    proc = serve(repo, port, fraction, log)
    try:
        wait_until_up(f"{url}/readyz", proc, 180, log)
        shutil.copytree(repo / NAME / "1", repo / NAME / "2")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # v2 loaded: a candidate (shadow on) or serving
            states = httpx.get(f"{url}/models/{NAME}").json()["version_states"]
            if any(s["version"] == 2 and s["state"] in ("candidate", "serving") for s in states):
                break
            time.sleep(1)
        out = tmp / f"bench-{tag}.json"
        subprocess.run(
            [sys.executable, "-m", "segserve.cli", "bench", "--url", url, "--concurrency", "8",
             "--duration", str(duration), "--sizes", SIZES, "--server-pid", str(proc.pid),
             "--json-out", str(out)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
        shadowed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("segserve_shadow_requests_total{") and 'outcome="ok"' in line
        )
        run = json.loads(out.read_text())["runs"][0]
        return {"shadow_fraction": fraction, "shadowed_ok": shadowed, **run}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segserve-shadow-"))
    runs = []
    for r in range(args.rounds):
        for fraction in (0.0, args.fraction):
            runs.append(one_run(fraction, args.duration, tmp, f"{r}-{fraction}"))
            print(
                json.dumps(
                    {
                        k: runs[-1].get(k)
                        for k in (
                            "shadow_fraction",
                            "shadowed_ok",
                            "throughput_rps",
                            "p50_ms",
                            "p99_ms",
                        )
                    }
                ),
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.json").write_text(
        json.dumps({"cpu": cpu_name(), "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
