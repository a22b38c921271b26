"""The client's side of a request: its body, read under a size limit and a time limit (a
multipart field `image` or the raw bytes of an image), and its leaving. Everything a client
can get wrong here is a 4xx with a reason."""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from segserve.service.errors import ServiceError
from segserve.service.intake import BodyLease

RAW_TYPES = ("image/", "application/octet-stream")
# RFC 9110 media type: type "/" subtype, each a token.
MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")


async def read_capped(request: Request, limit: int, deadline: float, idle_s: float = 10.0) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit`, and (408) when it has not
    all come by the request's deadline or the client is silent for `idle_s`. A too-large
    body is never held whole, whether Content-Length says so or a chunked body grows. Its
    bytes are taken from the body budget first (the request's lease, web/middleware.py): the
    declared length before a byte is read, a body without one chunk by chunk (503 when no
    room comes in time, service/intake.py)."""
    lease: BodyLease | None = request.scope.get("state", {}).get("body_lease")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ServiceError(400, "Content-Length is not a number", reason="bad_body")
        if int(declared) > limit:
            raise ServiceError(
                413,
                f"body of {declared} bytes is over the {limit}-byte limit",
                reason="body_too_large",
            )
        if lease is not None:
            await lease.take(int(declared), deadline - time.monotonic())
    chunks, size = [], 0
    stream = request.stream()
    while True:
        wait = min(idle_s, deadline - time.monotonic())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ServiceError(
                408, f"the body stopped arriving ({size} bytes in): too slow", reason="slow_body"
            ) from None
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"body is over the {limit}-byte limit", reason="body_too_large")
        if lease is not None and declared is None:
            await lease.take(len(chunk), deadline - time.monotonic())
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> tuple[str, str]:
    """(type, the whole header) of the request's Content-Type; '' when absent; 415 when
    it is not a media type at all."""
    header = request.headers.get("content-type")
    if header is None:
        return "", ""
    main = header.split(";", 1)[0].strip()
    if not MEDIA_TYPE.fullmatch(main):
        raise ServiceError(
            415, f"Content-Type {header[:100]!r} is not a media type", reason="media_type"
        )
    return main.lower(), header


async def image_bytes(request: Request, limit: int, deadline: float, idle_s: float = 10.0) -> bytes:
    """The image of a /segment request: multipart field `image`, or a raw image body (an
    image/* or application/octet-stream type, or none)."""
    kind, header = media_type(request)
    if kind == "multipart/form-data":
        body = await read_capped(request, limit, deadline, idle_s)
        return await _multipart_image(request, body, header)
    if kind == "" or kind.startswith(RAW_TYPES):
        return await read_capped(request, limit, deadline, idle_s)
    raise ServiceError(
        415,
        f"unsupported media type {kind!r}: send an image/* body or multipart/form-data "
        "with a field 'image'",
        reason="media_type",
    )


async def _multipart_image(request: Request, body: bytes, header: str) -> bytes:
    boundary = re.search(r'boundary="?([^";]{1,200})"?', header)
    if boundary is None:
        raise ServiceError(400, "multipart body without a boundary", reason="bad_body")
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary.group(1).encode("latin-1") + b"--"):
        raise ServiceError(400, "truncated multipart body: no closing boundary", reason="bad_body")

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=4, max_fields=16).parse()
    except MultiPartException as exc:
        raise ServiceError(
            400, f"malformed multipart body: {exc.message}", reason="bad_body"
        ) from exc
    field = form.get("image")
    if field is None:
        raise ServiceError(422, "multipart body has no field named 'image'", reason="bad_body")
    if not isinstance(field, UploadFile):
        raise ServiceError(
            422, "multipart field 'image' must be a file (with a filename)", reason="bad_body"
        )
    try:
        return await field.read()
    finally:
        await form.close()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (call it once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
