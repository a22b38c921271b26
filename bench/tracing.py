"""What tracing costs the server (docs/benchmarks.md, "Tracing"): `segserve serve`,
OpenTelemetry off (no OTEL_* variables) and on at 100 % sampling (OTLP over http/protobuf to
a receiver in this process that decodes and counts the spans), in rounds of alternating
order (off on, on off, ...); `segserve bench --concurrency 1` on 256x256 and 512x512 JPEGs
(no traceparent: each request starts its own trace). Reports server CPU per request (from
/proc), latency, and the spans the receiver got. `--model null` serves bench.overhead's
near-zero-cost model, so that what tracing adds is not lost in the network's own time;
`--model shipped` the default model.

    python -m bench.tracing [--model null|shipped] [--rounds 4] [--duration 15] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bench.overhead import null_model
from segserve.default_model import install
from segserve.loadgen import wait_until_up
from segserve.training.provenance import cpu_name


class Receiver(BaseHTTPRequestHandler):
    spans = 0

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        Receiver.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(
    traced: bool, receiver_port: int, duration: float, tmp: Path, tag: str, model: str
) -> dict:
    repo = tmp / f"repo-{tag}"
    shutil.rmtree(repo, ignore_errors=True)
    if model == "null":
        null_model(repo, uint8=True)
    else:
        install(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if traced:
        env.update(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver_port}",
        )
    port = free_port()
    log = tmp / f"server-{tag}.log"
    cmd = [sys.executable, "-m", "segserve.cli", "serve", "--repository", str(repo)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/readyz", proc, 180, log)
        out = tmp / f"bench-{tag}.json"
        before = Receiver.spans
        subprocess.run(
            [sys.executable, "-m", "segserve.cli", "bench", "--url", url, "--concurrency", "1",
             "--duration", str(duration), "--sizes", "256x256,512x512", "--server-pid",
             str(proc.pid), "--json-out", str(out)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        run = json.loads(out.read_text())["runs"][0]
    finally:
        proc.terminate()
        proc.wait(60)
    return {"traced": traced, "spans_received": Receiver.spans - before, **run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("null", "shipped"), default="null")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="segserve-tracing-"))
    runs = []
    keys = ("traced", "spans_received", "requests", "p50_ms", "server_cpu_ms_per_request")
    for r in range(args.rounds):
        for traced in (False, True) if r % 2 == 0 else (True, False):
            tag = f"{r}-{traced}"
            runs.append(one_run(traced, receiver.server_port, args.duration, tmp, tag, args.model))
            print(json.dumps({"round": r + 1, **{k: runs[-1].get(k) for k in keys}}), flush=True)
    cpu = {
        t: [x["server_cpu_ms_per_request"] for x in runs if x["traced"] is t] for t in (False, True)
    }
    summary = {
        "off_ms_median": float(np.median(cpu[False])),
        "on_ms_median": float(np.median(cpu[True])),
        "on_minus_off_ms_per_round": [
            on - off for on, off in zip(cpu[True], cpu[False], strict=True)
        ],
    }
    print(json.dumps(summary), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tracing-{args.model}.json").write_text(
        json.dumps({"cpu": cpu_name(), "model": args.model, "runs": runs, **summary}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
