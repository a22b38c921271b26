"""A client that uploads the way a crowd does: headers first, then the body in pieces at its
own pace, reading the answer as soon as it comes (before the body is all sent, if the server
answers early). What it reports lets a test tell "answered before its body was read" from
"read, then refused". Raw asyncio streams: no HTTP library buffers the body for it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Upload:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sent: int = 0  # body bytes written before the answer came
    size: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def answered_early(self) -> bool:
        return self.status != 0 and self.sent < self.size


async def upload(
    host: str,
    port: int,
    path: str,
    body: bytes,
    content_type: str = "image/jpeg",
    piece: int = 1 << 20,
    every_s: float = 0.2,
    chunked: bool = False,
    headers: dict[str, str] | None = None,
) -> Upload:
    """POST `body` in `piece`-byte writes every `every_s` s (Content-Length declared, or
    chunked transfer coding); returns the answer and how much was sent before it came."""
    result = Upload(size=len(body))
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    answer = asyncio.ensure_future(_read_answer(reader))
    view = memoryview(body)  # pieces without copies: a crowd's client must not be the bottleneck
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        while result.sent < len(body) and not answer.done():
            part = view[result.sent : result.sent + piece]
            if chunked:
                writer.write(b"%x\r\n" % len(part))
            writer.write(part)
            if chunked:
                writer.write(b"\r\n")
            await writer.drain()
            result.sent += len(part)
            if result.sent < len(body):
                await asyncio.wait([answer], timeout=every_s)
        if chunked and result.sent == len(body) and not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server answered and closed while we were sending: the answer tells
    try:
        result.status, result.headers, result.body = await asyncio.wait_for(answer, 120)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    result.seconds = time.perf_counter() - t0
    return result


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


def crowd(host: str, port: int, path: str, body_file: str, count: int, **options) -> list[Upload]:
    """`count` concurrent uploads of the file's bytes, in a process of its own (run it with
    multiprocessing: the crowd's client must not share an event loop, or a GIL, with the
    requests a test times beside it)."""
    with open(body_file, "rb") as f:
        body = f.read()

    async def main():
        return await asyncio.gather(
            *(upload(host, port, path, body, **options) for _ in range(count))
        )

    return asyncio.run(main())


def infer_request(model: str, pixels):
    """A gRPC ModelInferRequest (tritonclient's own protobuf) of UINT8 pixels, raw."""
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="UINT8", shape=list(pixels.shape)
    )
    return pb.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[pixels.tobytes()]
    )
