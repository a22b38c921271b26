"""The web page at /: a person picks a model, drops an image (or a sample) and sees the
segmentation. Plain HTML, JS and CSS from the package (no build step, no CDN). The page
itself is public; the API calls it makes carry the key the person gives it."""

from __future__ import annotations

import asyncio
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from segserve.service.errors import ServiceError
from segserve.service.media.samples import samples

STATIC = files("segserve.service.web") / "static"
PAGE_ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}
# The page runs only its own scripts and styles, and talks only to this server.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> HTMLResponse:
    return HTMLResponse(
        (STATIC / "index.html").read_text(),
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in PAGE_ASSETS:
        raise ServiceError(404, f"no asset {name!r}")
    return Response(
        (STATIC / name).read_bytes(),
        media_type=PAGE_ASSETS[name],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/samples")
async def sample_list() -> dict:
    """The sample images: [{name, url}]."""
    names = await asyncio.to_thread(lambda: list(samples()))
    return {"samples": [{"name": n, "url": f"/samples/{n}"} for n in names]}


@router.get("/samples/{name}")
async def sample(name: str) -> Response:
    images = await asyncio.to_thread(samples)
    if name not in images:
        raise ServiceError(404, f"no sample {name!r}")
    return Response(
        images[name], media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"}
    )
