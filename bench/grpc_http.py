"""The Open Inference Protocol over HTTP (binary tensors) and over gRPC, on loopback, one
server (docs/benchmarks.md, "gRPC beside HTTP"): tritonclient.http and tritonclient.grpc,
closed loop at each concurrency, one UINT8 [1, 256, 256, 3] image per request, rounds
alternating between the protocols.

    python -m bench.grpc_http [--concurrency 1 16] [--duration 15] [--rounds 2] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from segserve.default_model import NAME, install
from segserve.loadgen import wait_until_up
from segserve.training.provenance import cpu_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IMAGE = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), np.uint8)


def one_request(protocol: str, client) -> None:
    module = grpcclient if protocol == "grpc" else httpclient
    image = module.InferInput("image", list(IMAGE.shape), "UINT8")
    if protocol == "grpc":
        image.set_data_from_numpy(IMAGE)
    else:
        image.set_data_from_numpy(IMAGE, binary_data=True)
    client.infer(NAME, [image]).as_numpy("labels")


def level(protocol: str, address: str, concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    stop = time.monotonic() + duration

    def worker() -> None:
        if protocol == "grpc":
            client = grpcclient.InferenceServerClient(address)
        else:
            client = httpclient.InferenceServerClient(address, concurrency=1)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            one_request(protocol, client)
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "requests": len(ms),
        "throughput_rps": len(ms) / duration,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(0.99 * (len(ms) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segserve-grpc-"))
    install(tmp / "repo")
    http_port, grpc_port = free_port(), free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(tmp / "repo")]
    cmd += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    runs = []
    try:
        wait_until_up(f"http://127.0.0.1:{http_port}/readyz", proc, 180, log)
        addresses = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
        for protocol, address in addresses.items():  # warm both paths
            level(protocol, address, 1, 2.0)
        for _ in range(args.rounds):
            for c in args.concurrency:
                for protocol, address in addresses.items():
                    runs.append(level(protocol, address, c, args.duration))
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpc_http.json").write_text(
        json.dumps({"cpu": cpu_name(), "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
