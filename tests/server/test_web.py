"""The web page at `/`, driven in headless Chromium through Playwright against a real server on loopback:
type a prompt, generate, watch the progress bar move and the preview change, see the image with its
parameters and reuse them; paint a mask and inpaint; read a PNG's parameters; see the server's errors.

The browser is Debian's `chromium` (`.ci/run` installs it), or $SDLAB_CHROMIUM. Without one these tests
skip, except where CI or SDLAB_REQUIRE_BROWSER is set: there a missing browser fails them.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.reference import smooth_picture
from tests.server.conftest import start
from tests.server.wire import basic, png_from_b64

WAIT_MS = 60_000  # a job on a busy CI machine
STEPS = 40  # long enough for several progress events and previews, short enough for a test


def _required() -> bool:
    flags = (os.environ.get("CI", ""), os.environ.get("SDLAB_REQUIRE_BROWSER", ""))
    return any(flag.strip().lower() not in ("", "0", "false", "no") for flag in flags)


def _unavailable(reason: str):
    if _required():
        pytest.fail(f"{reason}; the web page tests must run here (CI or SDLAB_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


def _chromium() -> str | None:
    if os.environ.get("SDLAB_CHROMIUM"):
        return os.environ["SDLAB_CHROMIUM"]
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        _unavailable("no Chromium found: apt-get install chromium, or set SDLAB_CHROMIUM to a Chromium binary")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
    except Exception as e:  # noqa: BLE001 - any launch failure is "no usable browser"
        playwright.stop()
        _unavailable(f"Chromium at {executable} did not start: {e}")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_selector("body.ready")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _fill(page, **fields) -> None:
    for name, value in fields.items():
        selector = "#" + name.replace("_", "-")
        if page.eval_on_selector(selector, "e => e.tagName") == "SELECT":
            page.select_option(selector, str(value))
        else:
            page.fill(selector, str(value))


def _value(page, selector: str) -> str:
    return page.input_value(selector)


def _choices(page) -> tuple[str, str, str]:
    return _value(page, "#sampler"), _value(page, "#scheduler"), _value(page, "#model")


def _record_progress(page) -> None:
    """Keep every value the progress bar and its text take, and count preview changes, from now on."""
    page.evaluate("""() => {
        const bar = document.getElementById('progress'), text = document.getElementById('progress-text');
        window.seen = {values: [], texts: [], previews: 0};
        new MutationObserver(() => seen.values.push(bar.value)).observe(bar, {attributes: true, attributeFilter: ['value']});
        new MutationObserver(() => seen.texts.push(text.textContent)).observe(text, {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => seen.previews++).observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
    }""")


def _cards(page) -> int:
    return page.locator("#gallery .card").count()


def _wait_for_cards(page, n: int) -> None:
    """Until the gallery shows n images, each loaded."""
    page.wait_for_function("""(n) => {
        const images = Array.from(document.querySelectorAll('#gallery .card img'));
        return images.length >= n && images.every(i => i.naturalWidth > 0);
    }""", arg=n)


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_generate_shows_progress_and_the_image_with_its_parameters(page):
    _fill(page, prompt="a red circle", negative="blurry", steps=STEPS, width=32, height=32, seed=1234, cfg=5,
          sampler="Euler", scheduler="karras", model="alpha")
    _record_progress(page)
    page.click("#generate")
    _wait_for_cards(page, 1)

    seen = page.evaluate("window.seen")
    running = [v for v in seen["values"] if 0 < v < 1]
    assert len(set(running)) >= 2 and running == sorted(running), seen["values"]  # it moved, forwards
    assert page.eval_on_selector("#progress", "e => e.value") == 1
    assert any(re.search(rf"step \d+/{STEPS} · \d+% · ETA", t) for t in seen["texts"]), seen["texts"]
    assert seen["previews"] >= 1, "no preview was shown while sampling"
    assert page.is_hidden("#error")
    assert page.is_enabled("#generate") and page.is_hidden("#cancel")

    card = page.locator("#gallery .card").first
    assert card.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
    text = card.locator(".params").text_content()
    assert text.startswith("a red circle\nNegative prompt: blurry\n"), text
    for part in (f"Steps: {STEPS}", "Sampler: Euler", "Schedule type: Karras", "CFG scale: 5", "Seed: 1234",
                 "Size: 32x32", "Model: alpha"):
        assert part in text, (part, text)

    _fill(page, prompt="something else", negative="", steps=3, seed=-1, cfg=9, width=64, sampler="DDIM",
          scheduler="uniform")
    card.locator("button.reuse").click()
    assert _value(page, "#prompt") == "a red circle" and _value(page, "#negative") == "blurry"
    assert (_value(page, "#steps"), _value(page, "#seed"), _value(page, "#cfg")) == (str(STEPS), "1234", "5")
    assert (_value(page, "#width"), _value(page, "#height")) == ("32", "32")
    assert _choices(page) == ("Euler", "karras", "alpha")


def test_paint_a_mask_and_inpaint(page):
    init = smooth_picture(32, seed=3)
    _fill(page, prompt="a blue square", steps=4, width=32, height=32, seed=7, sampler="Euler")
    page.set_input_files("#init-file", {"name": "init.png", "mimeType": "image/png", "buffer": _png_bytes(init)})
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == [32, 32]
    assert "No mask" in page.text_content("#mask-state")

    page.fill("#brush-size", "40")  # screen pixels, over a 32-pixel image shown larger
    box = page.locator("#mask-canvas").bounding_box()
    mouse = page.mouse
    mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35)
    mouse.down()
    mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.65, steps=6)
    mouse.up()
    assert "Mask painted" in page.text_content("#mask-state")
    page.fill("#strength", "0.9")
    page.select_option("#fill", "noise")

    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert png_from_b64(body["image"].split(",", 1)[1]).size == (32, 32)
    mask = np.asarray(png_from_b64(body["mask"].split(",", 1)[1]).convert("L"))
    assert mask.shape == (32, 32)
    assert mask[16, 16] == 255 and mask[0, 0] == 0 and mask[31, 31] == 0  # white where painted, black elsewhere
    assert (body["strength"], body["fill"]) == (0.9, "noise")

    _wait_for_cards(page, 1)
    text = page.locator("#gallery .card .params").first.text_content()
    assert text.startswith("a blue square\n")
    for part in ("Denoising strength: 0.9", "Mask blur: 4", "Masked content: latent noise", "Size: 32x32"):
        assert part in text, (part, text)
    assert page.is_hidden("#error")

    page.click("#mask-clear")
    assert "No mask" in page.text_content("#mask-state")
    page.click("#init-clear")
    assert page.is_hidden("#editor")


def test_a_png_dropped_or_chosen_fills_the_form(page, server):
    reply = server.client().post("/sdapi/v1/txt2img", {
        "prompt": "from a file", "negative_prompt": "dull", "seed": 77, "steps": 3, "cfg_scale": 6.5,
        "sampler_name": "DDIM", "scheduler": "Exponential", "width": 32, "height": 32})
    assert reply.status == 200, reply.text
    png = base64.b64decode(reply.json()["images"][0])

    drop = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'made.png', {type: 'image/png'}));
        return data;
    }""", base64.b64encode(png).decode())
    page.dispatch_event("#pnginfo-drop", "drop", {"dataTransfer": drop})
    page.wait_for_function("document.getElementById('prompt').value === 'from a file'")
    assert "Steps: 3" in page.text_content("#pnginfo-text")
    assert _value(page, "#negative") == "dull"
    assert (_value(page, "#steps"), _value(page, "#seed"), _value(page, "#cfg")) == ("3", "77", "6.5")
    assert _choices(page) == ("DDIM", "exponential", "alpha")
    assert (_value(page, "#width"), _value(page, "#height")) == ("32", "32")

    plain = _png_bytes(Image.new("RGB", (8, 8), "white"))
    page.set_input_files("#pnginfo-file", {"name": "plain.png", "mimeType": "image/png", "buffer": plain})
    page.wait_for_function("document.getElementById('pnginfo-text').textContent.includes('no generation parameters')")
    assert _value(page, "#prompt") == "from a file"  # left as it was

    page.set_input_files("#pnginfo-file", {"name": "junk.png", "mimeType": "image/png", "buffer": b"not a png"})
    page.wait_for_selector("#error", state="visible")
    assert "not an image" in page.text_content("#error-text")


def test_server_errors_are_shown(page):
    _fill(page, prompt="too long", steps=6000, width=32, height=32)  # the test server's limit is 5000 steps
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error-text")
    assert "steps" in message and "5000" in message, message
    assert page.is_enabled("#generate") and _cards(page) == 0

    page.click("#error-close")
    assert page.is_hidden("#error")
    _fill(page, steps="")
    page.click("#generate")
    assert "Steps" in page.text_content("#error-text")

    def queue_full(route):
        route.fulfill(status=429, headers={"Retry-After": "8"}, content_type="application/json",
                      body='{"error": "QueueFull", "detail": "the queue is full; retry in 8 s", "retry_after": 8}')

    page.route("**/v1/jobs", queue_full)
    _fill(page, steps=2)
    page.click("#generate")
    page.wait_for_function("document.getElementById('error-text').textContent.includes('busy')")
    assert "8 s" in page.text_content("#error-text")


def test_the_page_works_behind_auth(browser, models_dir):
    server = start(models_dir, auth="user:pass")
    try:
        context = browser.new_context(http_credentials={"username": "user", "password": "pass"})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_selector("body.ready")
        _fill(page, prompt="behind a password", steps=2, width=32, height=32)
        page.click("#generate")
        _wait_for_cards(page, 1)
        assert "behind a password" in page.text_content("#gallery .card .params")
        assert page.is_hidden("#error")
        context.close()
        assert server.client(basic("user", "pass")).get("/").status == 200
    finally:
        server.stop()


def test_the_static_files_are_served(server):
    client = server.client()
    page = client.get("/")
    assert page.status == 200 and 'id="generate"' in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        reply = client.get(path)
        assert reply.status == 200 and kind in reply.headers["content-type"], (path, reply.headers)
