"""Reading the client's side of a request, on bare ASGI requests (no server): the body under
its size and time limits, raw or multipart, its media type, and the client leaving."""

import asyncio
import time

import pytest
from starlette.requests import Request

from segserve.service.errors import ServiceError
from segserve.service.web.body import image_bytes, media_type, read_capped, wait_for_disconnect

BOUNDARY = "b0undary"


def request(headers: dict[str, str], chunks: list[bytes], then_silence: bool = False):
    """A Request whose body arrives in `chunks`; after them the client says nothing more
    (`then_silence`) or leaves. `received` counts the chunks the server asked for."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or then_silence}
        for i, c in enumerate(chunks)
    ]
    received = []

    async def receive():
        received.append(1)
        if messages:
            return messages.pop(0)
        if then_silence:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/segment",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), received


def run(coro):
    return asyncio.run(coro)


def later() -> float:
    return time.monotonic() + 30


def test_a_body_within_the_limit_is_read_whole():
    req, _ = request({}, [b"abc", b"def"])
    assert run(read_capped(req, 6, later())) == b"abcdef"


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    req, received = request({"Content-Length": "1000"}, [b"x" * 1000])
    with pytest.raises(ServiceError) as caught:
        run(read_capped(req, 100, later()))
    assert caught.value.status == 413 and received == []


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    req, received = request({}, [b"x" * 60] * 100)
    with pytest.raises(ServiceError) as caught:
        run(read_capped(req, 100, later()))
    assert caught.value.status == 413 and len(received) == 2  # never held more than 120 bytes


def test_a_content_length_that_is_not_a_number_is_a_400():
    req, _ = request({"Content-Length": "12abc"}, [b""])
    with pytest.raises(ServiceError, match="not a number"):
        run(read_capped(req, 100, later()))


def test_a_client_that_goes_silent_gets_408_after_the_idle_time():
    req, _ = request({}, [b"part"], then_silence=True)
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        run(read_capped(req, 100, later(), idle_s=0.05))
    assert caught.value.status == 408 and "4 bytes in" in caught.value.detail
    assert time.monotonic() - t0 < 30  # the idle bound, not the request's deadline, ended it


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, ""),
        ("image/PNG", "image/png"),
        ("multipart/form-data; boundary=x", "multipart/form-data"),
    ],
)
def test_media_types_are_read_case_insensitively(header, expected):
    req, _ = request({"Content-Type": header} if header else {}, [b""])
    assert media_type(req)[0] == expected


@pytest.mark.parametrize("header", ["not a type", "image/png/extra", "/png"])
def test_a_content_type_that_is_no_media_type_is_a_415(header):
    req, _ = request({"Content-Type": header}, [b""])
    with pytest.raises(ServiceError) as caught:
        media_type(req)
    assert caught.value.status == 415


def multipart(field: str, filename: str | None, data: bytes, close: bool = True) -> bytes:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (
        (
            f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def test_an_image_comes_raw_or_as_the_multipart_field_image():
    req, _ = request({"Content-Type": "image/png"}, [b"PNGDATA"])
    assert run(image_bytes(req, 1000, later())) == b"PNGDATA"
    req, _ = request(MULTIPART, [multipart("image", "a.png", b"PNGDATA")])
    assert run(image_bytes(req, 1000, later())) == b"PNGDATA"


@pytest.mark.parametrize(
    "body, status, detail",
    [
        (multipart("image", "a.png", b"x", close=False), 400, "no closing boundary"),
        (multipart("other", "a.png", b"x"), 422, "no field named 'image'"),
        (multipart("image", None, b"x"), 422, "must be a file"),
    ],
)
def test_a_broken_multipart_body_is_a_4xx_that_says_what_is_wrong(body, status, detail):
    req, _ = request(MULTIPART, [body])
    with pytest.raises(ServiceError) as caught:
        run(image_bytes(req, 10_000, later()))
    assert caught.value.status == status and detail in caught.value.detail


def test_other_media_types_are_a_415():
    req, _ = request({"Content-Type": "application/json"}, [b"{}"])
    with pytest.raises(ServiceError) as caught:
        run(image_bytes(req, 1000, later()))
    assert caught.value.status == 415


def test_the_client_leaving_is_noticed_once_the_body_is_read():
    req, _ = request({}, [b"all of it"])
    run(read_capped(req, 100, later()))
    run(asyncio.wait_for(wait_for_disconnect(req), 5))  # returns: the next message is a disconnect
