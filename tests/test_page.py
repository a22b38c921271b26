"""The web page's routes (in-process): the page, its assets, the sample images. The page in a
real browser is tests/test_browser.py."""

from __future__ import annotations

import io
import re

from PIL import Image

from helpers import in_process
from segserve.service.media.samples import samples


def test_the_page_and_its_assets_load_from_the_server_only(tiny_repository):
    with in_process(
        tiny_repository, api_key="k"
    ) as app:  # the page is public, its API calls are not
        page = app.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            asset = app.get(f"/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", asset.text)
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
        assert app.get("/models").status_code == 401


def test_unknown_assets_and_samples_are_404_with_a_reason(tiny_repository):
    with in_process(tiny_repository) as app:
        for path in ("/static/../settings.py", "/static/index.html.bak", "/samples/none.jpg"):
            r = app.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path


def test_samples_are_listed_and_are_jpegs_the_model_segments(tiny_repository):
    with in_process(tiny_repository) as app:
        listing = app.get("/samples").json()["samples"]
        assert [s["name"] for s in listing] == list(samples())
        for s in listing:
            data = app.get(s["url"]).content
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and min(image.size) >= 176
            r = app.post("/segment", content=data, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200


def test_samples_are_the_same_on_every_server():
    """Rendered from a fixed seed: another process (another server) makes the same bytes."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import hashlib; from segserve.service.media.samples import samples\n"
        "print({k: hashlib.sha256(v).hexdigest() for k, v in samples().items()})"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = {k: hashlib.sha256(v).hexdigest() for k, v in samples().items()}
    assert other.stdout.strip() == str(here)
