"""The API's documentation, served whole by the app: Swagger UI and ReDoc from a packaged
copy (fastapi-offline's static files), never a CDN, so /docs works on a machine without
internet. With an API key, the spec follows `public_docs` (default: protected)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from segserve.service.errors import ServiceError
from segserve.service.web.routes.deps import authorize_docs

ASSETS = {
    "swagger-ui-bundle.js": ("fastapi_offline", "text/javascript"),
    "swagger-ui.css": ("fastapi_offline", "text/css"),
    "redoc.standalone.js": ("fastapi_offline", "text/javascript"),
    "favicon.png": ("fastapi_offline", "image/png"),
    "docs.js": ("segserve.service.web", "text/javascript"),
}

SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>segserve API</title>
  <link rel="icon" href="/docs/assets/favicon.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/docs.js"></script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


@router.get("/docs/assets/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ServiceError(404, f"no asset {name!r}")
    package, media_type = ASSETS[name]
    folder = files(package) / "static"
    return Response(
        (folder / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/docs")
async def swagger() -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE)


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="segserve API",
        redoc_js_url="/docs/assets/redoc.standalone.js",
        redoc_favicon_url="/docs/assets/favicon.png",
        with_google_fonts=False,
    )


def api_document(app: FastAPI) -> dict:
    """The OpenAPI document of this server, built once. FastAPI states a bearer scheme on every
    operation behind a key; here they stay only where this server's settings need one."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = app.openapi()
    s = app.state.service.settings
    dropped = {"apiKey", "metricsKey"} if s.api_key is None else set()
    if s.public_metrics:
        dropped.add("metricsKey")
    schemes = spec.get("components", {}).get("securitySchemes", {})
    for name in dropped:
        schemes.pop(name, None)
    if not schemes:
        spec.get("components", {}).pop("securitySchemes", None)
    for operations in spec["paths"].values():
        for operation in operations.values():
            kept = [r for r in operation.get("security", []) if not dropped & set(r)]
            if kept:
                operation["security"] = kept
            else:
                operation.pop("security", None)
    return spec


@router.get("/openapi.json", dependencies=[Depends(authorize_docs)])
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(api_document(request.app))
