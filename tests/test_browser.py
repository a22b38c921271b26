"""The web page and Swagger UI in a real browser: Debian's chromium driven by selenium
against a real server on loopback (`make tools` installs chromium and its driver).

With SEGSERVE_SCREENSHOTS=DIR the tests save what the browser showed (docs/images holds the
ones the README shows: `make screenshots`). They run against the default model that ships
with the project, as `make run` serves it; with SEGSERVE_BROWSER_REPOSITORY=R, against R."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes, require_tool, run_server
from segserve.default_model import install
from segserve.training.synth import DEFAULT_MODEL_SET, JPEG_QUALITY, SynthConfig, render_mosaic

KEY = "page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCREENSHOTS = os.environ.get("SEGSERVE_SCREENSHOTS")
INSTALL = "`make tools` installs Debian's chromium and chromium-driver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = os.environ.get("SEGSERVE_BROWSER_REPOSITORY")
    if repository is None:
        repository = tmp_path_factory.mktemp("shipped")
        install(repository)
    with run_server(repository, tmp_path_factory.mktemp("page"), api_key=KEY, variant="auto") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = (
        require_tool("chromium", INSTALL),
        require_tool("chromedriver", INSTALL),
    )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1250",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))


def page_state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def canvas_rgb(driver, canvas_id: str) -> np.ndarray:
    url = driver.execute_script(f"return document.getElementById('{canvas_id}').toDataURL()")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def upload(driver, path: Path) -> None:
    driver.find_element("id", "file").send_keys(str(path))


def test_the_page_asks_for_the_key_then_segments_an_uploaded_image(server, browser, tmp_path):
    driver = browser
    driver.get(server.url + "/")
    # The key is set: /models answers 401 and the page asks for the key.
    wait_for(driver, lambda d: d.find_element("id", "key-form").is_displayed())
    assert "401" in driver.find_element("id", "status").text
    driver.find_element("id", "key").send_keys(KEY)
    driver.find_element("css selector", "#key-form button").click()
    wait_for(driver, lambda d: page_state(d) == "ready")
    assert not driver.find_element("id", "key-form").is_displayed()
    listing = httpx.get(server.url + "/models", headers=AUTH).json()
    options = [o.text for o in driver.find_elements("css selector", "#model option")]
    assert options == [f"{m['name']} v{m['version']}" for m in listing["models"]]

    sample = httpx.get(server.url + "/samples/shapes-1.jpg").content
    path = tmp_path / "shapes.jpg"
    path.write_bytes(sample)
    upload(driver, path)
    wait_for(driver, lambda d: page_state(d) in ("done", "error"))
    assert page_state(driver) == "done", driver.find_element("id", "status").text

    # What the page shows is what the server answers for the same image and model.
    model = next(m for m in listing["models"] if m["name"] == listing["default"])
    answer = httpx.post(
        server.url + "/segment?format=json",
        content=sample,
        headers={**AUTH, "Content-Type": "image/jpeg"},
    ).json()
    rows = driver.find_elements("css selector", "#legend tbody tr")
    assert [r.find_elements("tag name", "td")[1].text for r in rows] == [
        c["name"] for c in answer["classes"]
    ]
    assert [r.find_elements("tag name", "td")[2].text for r in rows] == [
        f"{100 * c['fraction']:.1f} %" for c in answer["classes"]
    ]
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["label_png"]))))
    palette = np.array([c["color"] for c in model["classes"]], np.uint8)
    hidden = {c["id"] for c in answer["classes"] if c["name"] == "background"}
    expected = palette[labels]
    for cid in hidden:
        expected[labels == cid] = 40
    assert np.array_equal(canvas_rgb(driver, "labels"), expected)

    timings = [
        r.find_element("tag name", "td").text
        for r in driver.find_elements("css selector", "#timings tbody tr")
    ]
    assert {"decode", "inference", "total"} <= set(timings)
    for link in ("download-png", "download-json"):
        element = driver.find_element("id", link)
        assert element.get_attribute("href").startswith("blob:")
        assert element.get_attribute("download")
    screenshot(driver, "web-page.png")

    # The opacity slider: at 100 % the overlay is the class colours where classes show.
    shown = ~np.isin(labels, list(hidden))
    driver.execute_script(
        "const s = document.getElementById('opacity'); s.value = 100;"
        "s.dispatchEvent(new Event('input'));"
    )
    overlay = canvas_rgb(driver, "overlay")
    assert np.array_equal(overlay[shown], palette[labels][shown])

    # A legend checkbox flips its class: shown, it takes the class colour in both views
    # (the overlay is at 100 %); hidden, it is grey in the label view and the image itself
    # in the overlay.
    first = answer["classes"][0]
    region = labels == first["id"]
    driver.find_element("css selector", f"#legend tr[data-class-id='{first['id']}'] input").click()
    colour = palette[first["id"]]
    if first["id"] in hidden:
        assert (canvas_rgb(driver, "labels")[region] == colour).all()
        assert (canvas_rgb(driver, "overlay")[region] == colour).all()
    else:
        assert (canvas_rgb(driver, "labels")[region] == 40).all()
        original = np.asarray(Image.open(io.BytesIO(sample)).convert("RGB")).astype(int)
        drawn = canvas_rgb(driver, "overlay")[region].astype(int)
        assert np.abs(drawn - original[region]).max() <= 3


def test_the_page_explains_a_refused_file(server, browser, tmp_path):
    driver = browser
    if page_state(driver) in (None, "loading"):  # run alone: the key from the test above
        driver.get(server.url + "/")
        driver.execute_script(f"sessionStorage.setItem('segserve-api-key', '{KEY}')")
    driver.get(server.url + "/")
    wait_for(driver, lambda d: page_state(d) == "ready")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    upload(driver, text)
    wait_for(driver, lambda d: page_state(d) == "error")
    status = driver.find_element("id", "status").text
    assert status.startswith("415: This kind of file is not accepted")
    assert "Request id:" in status

    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(64, 64))
    upload(driver, big)  # and the next image works again
    wait_for(driver, lambda d: page_state(d) in ("done", "error"))
    assert page_state(driver) == "done"


def test_swagger_ui_renders_offline_with_an_image_upload_for_segment(server, browser):
    driver = browser
    driver.get(server.url + "/")
    driver.execute_script(f"sessionStorage.setItem('segserve-api-key', '{KEY}')")
    driver.get(server.url + "/docs")
    operation = wait_for(
        driver,
        lambda d: d.find_elements("css selector", "#operations-default-segment_segment_post"),
    )[0]
    operation.find_element("css selector", ".opblock-summary").click()
    wait_for(driver, lambda d: d.find_elements("css selector", ".try-out__btn"))[0].click()
    # The request body: a file input for the image (multipart/form-data, the first type).
    inputs = wait_for(
        driver,
        lambda d: d.find_elements(
            "css selector", "#operations-default-segment_segment_post input[type=file]"
        ),
    )
    assert inputs
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", inputs[0])
    screenshot(driver, "swagger-ui.png")
    # Nothing on the page came from anywhere but this server.
    sources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert sources and all(s.startswith(server.url) for s in sources), sources


@pytest.mark.slow  # 15 tiles of the shipped model: make test-slow, with the other large images
def test_a_4_megapixel_upload_is_segmented_at_its_own_size_and_shown_scaled(
    server, browser, tmp_path
):
    """A 2400x1600 photo of fresh samples: the server runs it in tiles at its own resolution,
    the page says so and draws the result scaled to at most 2 MP, the label PNG to download
    at full size."""
    driver = browser
    driver.get(server.url + "/")
    driver.execute_script(f"sessionStorage.setItem('segserve-api-key', '{KEY}')")
    driver.get(server.url + "/")
    wait_for(driver, lambda d: page_state(d) == "ready")
    config = SynthConfig(count=10**6, seed=31, **DEFAULT_MODEL_SET)
    rgb, _, _ = render_mosaic(config, (1600, 2400))
    path = tmp_path / "large.jpg"
    Image.fromarray(rgb).save(path, "JPEG", quality=JPEG_QUALITY)
    upload(driver, path)
    wait_for(driver, lambda d: page_state(d) in ("done", "error"), seconds=120)
    assert page_state(driver) == "done", driver.find_element("id", "status").text
    said = driver.find_element("id", "inference").text
    assert (
        said.startswith("Segmented at its own resolution, 2400×1600, in ") and " tiles of " in said
    )
    assert "Shown at 72 % (1732×1155)" in said
    # the variant this server measured fastest, as /models says
    variant = httpx.get(f"{server.url}/models/unet-shapes", headers=AUTH).json()["variant"]
    assert f"{variant} on cpu" in driver.find_element("id", "model-info").text
    for canvas in ("overlay", "labels"):
        size = driver.execute_script(
            f"const c = document.getElementById('{canvas}'); return [c.width, c.height]"
        )
        assert size == [1732, 1155]
    href = driver.find_element("id", "download-png").get_attribute("href")
    full = driver.execute_async_script(
        # An <img>, as a user opening the link would see it (the page's CSP allows blob:
        # images, not fetches of them).
        "const done = arguments[1]; const i = new Image();"
        "i.onload = () => done([i.naturalWidth, i.naturalHeight]);"
        "i.onerror = () => done('the label PNG did not load'); i.src = arguments[0];",
        href,
    )
    assert full == [2400, 1600]
    driver.execute_script("document.getElementById('result').scrollIntoView()")
    screenshot(driver, "large-image.png")
