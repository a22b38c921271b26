"""Request bodies in flight are budgeted (service/intake.py): a request takes its body's bytes
before the body is read, waits for room a bounded time, then is answered 503 with
Retry-After, its body unread and its connection closed; small requests pass beside a crowd
of large ones; HTTP and gRPC share the budget. The budget's rules on their own, then a real
server with a small budget and real sockets (the full-size crowd: tests/test_crowd.py)."""

from __future__ import annotations

import asyncio
import io
import json
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from helpers import free_port, metric_samples, run_server
from segserve.service.errors import ServiceError
from segserve.service.intake import BodyBudget, BodyLease
from uploads import infer_request, upload


def run(coro):
    return asyncio.run(coro)


def test_a_small_share_passes_beside_a_large_one_waiting_and_waiters_get_room_in_order():
    async def main():
        seen = []
        budget = BodyBudget(10, seen.append)
        assert budget.try_take(7)
        large = asyncio.ensure_future(budget.take(6, 5))
        later = asyncio.ensure_future(budget.take(5, 5))
        await asyncio.sleep(0)
        assert budget.try_take(2) and budget.used == 9  # first fit: not behind the waiters
        budget.give_back(7)  # room for the first waiter (6), not yet for the second (5)
        assert await large and budget.used == 8 and not later.done()
        budget.give_back(2)
        budget.give_back(6)
        assert await later and budget.used == 5
        return seen

    assert run(main())[-1] == 5  # the gauge follows every change


def test_a_share_that_gets_no_room_in_time_takes_nothing():
    async def main():
        budget = BodyBudget(10)
        budget.try_take(10)
        t0 = time.monotonic()
        assert not await budget.take(1, 0.05) and time.monotonic() - t0 < 1
        assert not await budget.take(11, 60)  # more than the whole budget: at once
        waiting = asyncio.ensure_future(budget.take(4, 5))
        await asyncio.sleep(0)
        waiting.cancel()
        budget.give_back(10)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return budget.used

    assert run(main()) == 0


def test_a_lease_refuses_with_503_and_retry_after_and_gives_back_whole():
    async def main():
        budget = BodyBudget(100)
        lease = BodyLease(budget, wait_s=0.05)
        await lease.take(60, time_left=10)
        lease.shrink_to(40)
        assert budget.used == 40
        other = BodyLease(budget, wait_s=30)
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as refused:
            await other.take(70, time_left=0.2)  # never past half the time left
        assert time.monotonic() - t0 < 1 and other.refused
        lease.release()
        return refused.value, budget.used

    error, used = run(main())
    assert error.status == 503 and error.reason == "body_budget" and used == 0
    assert error.headers == {"Retry-After": "1"} and "do not fit" in error.detail


def png(h: int, w: int, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


BIG = png(590, 590, seed=1)  # about 1 MB


@pytest.fixture(scope="module")
def small_budget_server(tiny_repository, tmp_path_factory):
    """A server whose body budget holds three BIG uploads and 100 kB more; a request waits
    at most 1 s for room."""
    grpc_port = free_port()
    with run_server(
        tiny_repository, tmp_path_factory.mktemp("intake"), max_body_bytes=1_100_000,
        max_inflight_body_bytes=3 * len(BIG) + 100_000, body_wait_s=1.0, grpc_port=grpc_port,
    ) as server:  # fmt: skip
        server.port = int(server.url.rsplit(":", 1)[1])
        server.grpc_port = grpc_port
        yield server


async def metrics(server) -> dict:
    async with httpx.AsyncClient(base_url=server.url) as client:
        return metric_samples((await client.get("/metrics")).text)


def slow_uploads(server, count: int, per_step: int) -> list[asyncio.Future]:
    """`count` BIG uploads, `per_step` bytes every 0.2 s."""
    return [
        asyncio.ensure_future(
            upload(
                "127.0.0.1", server.port, "/segment", BIG, "image/png", piece=per_step, every_s=0.2
            )
        )  # fmt: skip
        for _ in range(count)
    ]


def test_past_the_budget_uploads_are_refused_unread_while_small_ones_are_served(
    small_budget_server,
):
    """Five slow 1 MB uploads (100 kB every 0.2 s) and, once they are under way, a small
    image and a chunked upload: three fit and are served, two are answered 503 with
    Retry-After and Connection: close while their clients are still sending (their bodies
    were never read); the small one is served beside them; the chunked one, counted as it
    arrives, finds no room for its first 200 kB either."""
    server = small_budget_server
    assert 900_000 < len(BIG) < 1_100_000

    async def crowd():
        slow = slow_uploads(server, 5, 100_000)
        await asyncio.sleep(0.6)
        small = await upload("127.0.0.1", server.port, "/segment", png(64, 64), "image/png")
        held = (await metrics(server))["segserve_inflight_body_bytes"][0].value
        chunked = await upload("127.0.0.1", server.port, "/segment", BIG, "image/png",
                               piece=200_000, every_s=0.2, chunked=True)  # fmt: skip
        return await asyncio.gather(*slow), small, held, chunked, await metrics(server)

    answers, small, held, chunked, after = run(asyncio.wait_for(crowd(), 60))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200, 200, 200, 503, 503], [(a.status, a.error) for a in answers]
    for refused in [a for a in answers if a.status == 503]:
        assert refused.answered_early, (refused.sent, refused.size)  # before the body came
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert json.loads(refused.body)["error"] == "unavailable"
    assert small.status == 200 and small.seconds < 5
    assert held >= 3 * len(BIG)  # three bodies held while they were being received
    assert chunked.status == 503 and chunked.answered_early, (chunked.status, chunked.sent)
    assert after["segserve_inflight_body_bytes"][0].value == 0  # all given back
    refused = {s.labels["reason"]: s.value for s in after["segserve_rejected_total"]}
    assert refused["body_budget"] >= 3


def test_grpc_messages_share_the_budget_and_are_refused_before_they_are_read(
    small_budget_server,
):
    """With the budget held by slow HTTP uploads, a gRPC ModelInfer call (each takes twice
    the most a message may be while it arrives) is refused UNAVAILABLE with a retry-after
    trailer within its wait; with room again the same call is answered."""
    server = small_budget_server
    pixels = np.zeros((1, 300, 300, 3), np.uint8)
    request = infer_request("tiny", pixels)

    async def main():
        holding = slow_uploads(server, 3, 100_000)  # 2 s each: past the 1 s wait
        await asyncio.sleep(0.6)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(request, timeout=20)
            waited = time.monotonic() - t0
            await asyncio.gather(*holding)
            answer = await stub.ModelInfer(request, timeout=20)
        return refused.value, waited, answer

    error, waited, answer = run(main())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "do not fit" in error.details()
    assert dict(error.trailing_metadata())["retry-after"] == "1" and waited < 5
    assert answer.outputs[0].shape == [1, 300, 300]
