"""The guarded HTTP protocol on its own: uvicorn's httptools protocol fed bytes through a
recording transport (no socket), so the head-size bound (431) and the slow-head bound (408)
are checked byte by byte. tests/test_server.py checks the same over a real socket."""

import asyncio
import json

import uvicorn
from uvicorn.server import ServerState

from helpers import await_for
from segserve.service.web.protocol import guarded_protocol


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent, self.closed = b"", False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def connect(max_header_bytes=2048, idle_timeout_s=10.0):
    config = uvicorn.Config(ok_app, log_level="critical")
    config.load()
    protocol_class = guarded_protocol(max_header_bytes, idle_timeout_s)
    protocol = protocol_class(config, ServerState(), {})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


def status_and_body(sent: bytes) -> tuple[int, dict]:
    head, _, body = sent.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_head_over_the_limit_is_refused_with_431_and_the_connection_closed():
    async def main():
        protocol, transport = connect(max_header_bytes=2048)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
        return transport

    transport = asyncio.run(main())
    status, body = status_and_body(transport.sent)
    assert status == 431 and body["error"] == "headers_too_large" and transport.closed


def test_a_head_under_the_limit_reaches_the_app():
    async def main():
        protocol, transport = connect(max_header_bytes=2048)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nX-Small: " + b"a" * 100 + b"\r\n\r\n")
        await await_for(lambda: transport.sent, 10, "the app's answer")  # a task of its own
        return transport

    transport = asyncio.run(main())
    assert transport.sent.startswith(b"HTTP/1.1 200") and not transport.closed


def test_a_head_that_does_not_finish_in_time_gets_408():
    async def main():
        protocol, transport = connect(idle_timeout_s=0.05)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        await await_for(lambda: transport.closed, 10, "the head timer closing the connection")
        return transport

    transport = asyncio.run(main())
    status, body = status_and_body(transport.sent)
    assert status == 408 and body["error"] == "request_timeout" and transport.closed
