"""The load generator's statistics against a stub server whose answers are known exactly."""

import asyncio
import json
import os
import threading

import pytest
import uvicorn

from helpers import free_port, wait_for
from segserve import loadgen
from segserve.cli import main

DELAY_S = 0.02


class StubServer:
    """POST /segment: sleeps DELAY_S; every 5th request answers 503. /metrics: one batch of 2
    per request, with 10 ms of inference and 1 ms of decode each."""

    def __init__(self) -> None:
        self.count = 0
        self.seen: list[tuple[str, dict, int]] = []  # (path, headers, body bytes) per request

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/metrics":
            n = self.count
            body = (
                "# TYPE segserve_stage_duration_seconds histogram\n"
                f'segserve_stage_duration_seconds_count{{model="m",stage="inference"}} {n}\n'
                f'segserve_stage_duration_seconds_sum{{model="m",stage="inference"}} {0.010 * n}\n'
                f'segserve_stage_duration_seconds_count{{model="m",stage="decode"}} {n}\n'
                f'segserve_stage_duration_seconds_sum{{model="m",stage="decode"}} {0.001 * n}\n'
                "# TYPE segserve_batch_size histogram\n"
                f'segserve_batch_size_count{{model="m"}} {n}\n'
                f'segserve_batch_size_sum{{model="m"}} {2 * n}\n'
            ).encode()
            status = 200
        elif scope["method"] != "POST":  # the bench's reachability check
            body, status = b"", 404
        else:
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.seen.append((scope["path"], headers, size))
            self.count += 1
            number = self.count
            await asyncio.sleep(DELAY_S)
            status, body = (503, b'{"error":"unavailable"}') if number % 5 == 0 else (200, b"png")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def stub():
    app = StubServer()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the stub server started")
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_summary_statistics_are_exact_on_known_latencies():
    latencies = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    stats = loadgen.summarize(4, latencies + [5.0], [200] * 100 + [503], elapsed_s=2.0)
    assert stats.requests == 101 and stats.ok == 100
    assert stats.throughput_rps == 50.0
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == pytest.approx(99.01)
    assert stats.max_ms == pytest.approx(100.0)  # the failed 5 s request is not a latency sample
    assert stats.status_counts == {"200": 100, "503": 1}


def test_latencies_are_also_summarised_per_image_size():
    stats = loadgen.summarize(
        1, [0.01, 0.03, 0.1, 0.3], [200, 200, 200, 503], 1.0, ["8x8", "8x8", "9x9", "9x9"]
    )
    assert stats.p50_ms_by_size == pytest.approx({"8x8": 20.0, "9x9": 100.0})


def test_bench_counts_every_answer_and_reads_the_server_breakdown(stub):
    app, url = stub
    images = loadgen.synthetic_images([(32, 48)], per_size=2)
    start_count = app.count
    (stats,) = loadgen.bench(
        loadgen.Target(url), [3], 1.0, images, progress=False, server_pid=os.getpid()
    )
    sent = app.count - start_count
    assert stats.requests == sent
    assert stats.status_counts.get("503", 0) + stats.ok == sent
    assert abs(stats.status_counts.get("503", 0) - sent // 5) <= 1
    assert stats.p50_ms >= DELAY_S * 1000 and stats.max_ms >= stats.p99_ms >= stats.p50_ms
    assert stats.server_stage_ms["inference"] == pytest.approx(10.0)
    assert stats.server_stage_ms["decode"] == pytest.approx(1.0)
    assert stats.server_mean_batch == pytest.approx(2.0)
    assert stats.server_batches == sent
    assert stats.server_cpu_ms_per_request > 0  # this process is the stub's "server"
    path, headers, size = app.seen[-1]
    assert path == "/segment" and headers["content-type"] == "image/jpeg" and size > 100


def test_v2_requests_carry_binary_uint8_tensors(stub):
    app, url = stub
    images = loadgen.synthetic_images([(32, 48)], per_size=1)
    loadgen.bench(loadgen.Target(url, "v2", "m"), [1], 0.2, images, progress=False)
    path, headers, size = app.seen[-1]
    header_length = int(headers["inference-header-content-length"])
    assert path == "/v2/models/m/infer" and size == header_length + 32 * 48 * 3


def test_bench_cli_prints_one_json_object_and_a_plot(stub, tmp_path, capsys):
    _, url = stub
    plot = tmp_path / "bench.png"
    args = [
        "bench",
        "--url",
        url,
        "--concurrency",
        "1",
        "2",
        "--duration",
        "0.5",
        "--sizes",
        "40x40",
        "--json",
        "--plot",
        str(plot),
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["url"] == url and report["images"] == ["40x40"]
    assert [r["concurrency"] for r in report["runs"]] == [1, 2]
    assert plot.stat().st_size > 1000
    assert main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--duration", "0.2"]) == 1


def test_synthetic_images_of_several_sizes_come_mixed_not_in_runs_of_one_size():
    sizes = [(32, 48), (40, 40), (24, 64)]
    images = loadgen.synthetic_images(sizes, per_size=4)
    order = [im.size for im in images]
    assert sorted(order) == sorted(sizes * 4)
    changes = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert changes > len(sizes) - 1, order  # in runs of one size there would be 2 changes
    assert order == [im.size for im in loadgen.synthetic_images(sizes, per_size=4)]  # seeded
