"""Reading a request body under a size limit: a multipart field `image` or the raw bytes."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from segserve.service.errors import ServiceError

RAW_TYPES = ("image/", "application/octet-stream")


async def read_capped(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit`: a too-large body is never
    held in memory, whether Content-Length says so up front or a chunked body grows past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "Content-Length is not a number", reason="bad_body")
        if int(declared) > limit:
            raise ServiceError(
                413,
                f"body of {declared} bytes is over the {limit}-byte limit",
                reason="body_too_large",
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"body is over the {limit}-byte limit", reason="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limit: int) -> bytes:
    """The image of a /segment request: multipart field `image`, or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        body = await read_capped(request, limit)

        async def replay():
            yield body

        try:
            form = await MultiPartParser(
                request.headers, replay(), max_files=4, max_fields=16
            ).parse()
        except MultiPartException as exc:
            raise ServiceError(
                400, f"malformed multipart body: {exc.message}", reason="bad_body"
            ) from exc
        field = form.get("image")
        if field is None:
            raise ServiceError(422, "multipart body has no field named 'image'", reason="bad_body")
        if isinstance(field, UploadFile):
            data = await field.read()
            await field.close()
            return data
        return field.encode("latin-1")
    if content_type == "" or content_type.startswith(RAW_TYPES):
        return await read_capped(request, limit)
    raise ServiceError(
        415,
        f"unsupported media type {content_type!r}: send an image/* body or multipart/form-data "
        "with a field 'image'",
        reason="media_type",
    )
