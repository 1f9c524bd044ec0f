"""The drawing page end to end: a real `digitkit serve` and a real headless Chromium drawing digits stroke by stroke.

Strokes are drawn in canvas-relative coordinates (0..1 across the canvas) with many intermediate pointer
events, as a person's hand would make them; the page sends the canvas to the server and shows its answer.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serving import Server, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
Stroke = list[tuple[float, float]]


# ------------------------------------------------------------------------------------------ digits as strokes
def polyline(*points: tuple[float, float], step: float = 0.045) -> Stroke:
    """Straight segments through `points`, sampled every `step` (16 px on the page: a quick hand at 60 Hz)."""
    out = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        n = max(1, round(math.dist((x0, y0), (x1, y1)) / step))
        out += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return out


def arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 16) -> Stroke:
    """An elliptical arc; angles in degrees, 0 = right, 90 = down (screen coordinates)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in (start_deg + (end_deg - start_deg) * i / n for i in range(n + 1))]  # fmt: skip


DIGITS: dict[str, list[Stroke]] = {
    # Counter-clockwise from the top, closing a little past the start, as most people write a zero.
    "0": [arc(0.5, 0.5, 0.2, 0.32, -90, -450)],
    "1": [polyline((0.53, 0.17), (0.48, 0.83))],
    # A hook over the top, a diagonal down to the left, a flat base.
    "2": [arc(0.5, 0.33, 0.18, 0.15, 190, 360) + polyline((0.68, 0.36), (0.31, 0.8), (0.72, 0.8))[1:]],
    # Two bumps to the right.
    "3": [arc(0.48, 0.33, 0.19, 0.15, 200, 450) + arc(0.48, 0.65, 0.21, 0.17, -90, 160)[1:]],
    # The open four: an L, then the down stroke. Undo takes the down stroke away.
    "4": [polyline((0.33, 0.17), (0.29, 0.57), (0.74, 0.57)), polyline((0.64, 0.2), (0.63, 0.85))],
    "7": [polyline((0.27, 0.2), (0.73, 0.2), (0.43, 0.83))],
}


# ------------------------------------------------------------------------------------------ the browser side
@dataclass
class Browser:
    page: object
    server: Server
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def box(self) -> dict[str, float]:
        return self.page.locator("#canvas").bounding_box()

    def to_page(self, x: float, y: float) -> tuple[float, float]:
        b = self.box()
        return b["x"] + x * b["width"], b["y"] + y * b["height"]

    def draw_mouse(self, strokes: list[Stroke]) -> None:
        mouse = self.page.mouse
        for stroke in strokes:
            mouse.move(*self.to_page(*stroke[0]))
            mouse.down()
            for point in stroke[1:]:
                mouse.move(*self.to_page(*point))
            mouse.up()

    def draw_cdp(self, strokes: list[Stroke], kind: str) -> None:
        """Real input events from the browser's input pipeline: `touch` (a finger) or `pen` (a stylus)."""
        cdp = self.page.context.new_cdp_session(self.page)
        try:
            for stroke in strokes:
                for i, point in enumerate(stroke):
                    x, y = self.to_page(*point)
                    if kind == "touch":
                        phase = "touchStart" if i == 0 else "touchMove"
                        cdp.send("Input.dispatchTouchEvent", {"type": phase, "touchPoints": [{"x": x, "y": y}]})
                    else:
                        phase = "mousePressed" if i == 0 else "mouseMoved"
                        cdp.send("Input.dispatchMouseEvent", {"type": phase, "x": x, "y": y, "button": "left",
                                 "buttons": 1, "clickCount": 1, "pointerType": "pen"})  # fmt: skip
                if kind == "touch":
                    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
                else:
                    cdp.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": x, "y": y,
                             "button": "left", "buttons": 0, "clickCount": 1, "pointerType": "pen"})  # fmt: skip
        finally:
            cdp.detach()

    def settled(self) -> dict[str, str]:
        """Wait until the answer on screen (saliency included) belongs to the drawing on screen."""
        self.page.wait_for_function(
            "() => { const d = document.body.dataset; return d.state === 'error' || "
            "(d.answered === d.drawing && (d.state === 'ready' || d.state === 'idle')); }", timeout=15_000)  # fmt: skip
        return self.page.evaluate("() => ({...document.body.dataset})")

    def result(self) -> dict:
        return self.page.evaluate("""() => ({
            digit: document.querySelector('#digit').textContent,
            message: document.querySelector('#message').textContent,
            bars: [...document.querySelectorAll('#bars [data-digit]')].map(b => [b.dataset.digit, +b.dataset.p]),
            input: document.querySelector('#input-image').getAttribute('src') || '',
            saliency: document.querySelector('#saliency-image').getAttribute('src') || '',
            input_width: document.querySelector('#input-image').naturalWidth,
            saliency_width: document.querySelector('#saliency-image').naturalWidth,
        })""")

    def clear(self) -> None:
        if self.page.is_enabled("#clear"):
            self.page.click("#clear")
        self.settled()

    def check_clean(self) -> None:
        """Nothing fetched from anywhere but the server, and nothing logged as an error."""
        foreign = [u for u in self.requests if not u.startswith(self.server.url + "/")]
        assert not foreign, f"the page fetched from other hosts: {foreign}"
        assert not self.console_errors, f"console errors: {self.console_errors}"


@pytest.fixture(scope="module")
def browser(mnist_small_run: Path, tmp_path_factory) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        reason = f"{CHROMIUM} is missing (apt install chromium); the drawing page needs a real browser"
        if os.environ.get("DIGITKIT_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("webpage")
    with serve(mnist_small_run, tmp) as server, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = chromium.new_context(viewport={"width": 900, "height": 820}, has_touch=True)
        page = context.new_page()
        b = Browser(page, server)
        page.on("request", lambda r: b.requests.append(r.url))
        page.on("console", lambda m: b.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: b.console_errors.append(str(e)))
        # Which kinds of pointer reached the canvas: proves the touch and pen paths are real.
        page.add_init_script("window.pointerTypes = new Set(); addEventListener('pointerdown', "
                             "e => window.pointerTypes.add(e.pointerType), true);")  # fmt: skip
        page.goto(server.url + "/")
        page.wait_for_function("() => document.body.dataset.loaded === '1'")
        try:
            yield b
        finally:
            chromium.close()


def test_page_loads_offline_with_ten_empty_bars(browser: Browser) -> None:
    page = browser.page
    assert page.locator("#bars [data-digit]").count() == 10
    assert page.text_content("#message") == "Draw a digit"
    assert page.text_content("#digit") == ""
    assert page.evaluate("getComputedStyle(document.querySelector('#canvas')).touchAction") == "none"
    assert page.is_disabled("#undo") and page.is_disabled("#clear")
    assert "% validation accuracy" in page.text_content("#model-info")  # this run has no test score
    browser.check_clean()


@pytest.mark.parametrize("digit", list(DIGITS))
def test_drawn_digit_is_recognized(browser: Browser, digit: str, tmp_path: Path) -> None:
    browser.clear()
    browser.draw_mouse(DIGITS[digit])
    state = browser.settled()
    res = browser.result()
    assert state["state"] == "ready" and state["strokes"] == str(len(DIGITS[digit]))
    assert res["digit"] == digit, f"drew {digit}, the page shows {res['digit']!r} ({res['message']}) {res['bars']}"
    probs = dict(res["bars"])
    assert sorted(probs) == [str(k) for k in range(10)]
    assert abs(sum(probs.values()) - 1) < 1e-3
    assert max(probs, key=probs.get) == digit
    assert res["input"].startswith("data:image/png;base64,") and res["input_width"] == 28
    assert res["saliency"].startswith("data:image/png;base64,") and res["saliency_width"] == 28
    if digit == "7":
        browser.page.screenshot(path=str(tmp_path / "page.png"))
    browser.check_clean()


def test_undo_removes_the_last_stroke_and_clear_resets(browser: Browser) -> None:
    page = browser.page
    browser.clear()
    browser.draw_mouse(DIGITS["4"])
    four = browser.settled()
    before = browser.result()
    assert four["strokes"] == "2" and before["digit"] == "4"

    page.keyboard.press("Control+z")
    after_undo = browser.settled()
    after = browser.result()
    assert after_undo["strokes"] == "1"
    assert int(after_undo["predictions"]) > int(four["predictions"])
    assert after["input"] != before["input"], "the model saw the same image after undo"
    assert after["digit"] != "4" or dict(after["bars"])["4"] < dict(before["bars"])["4"] - 0.05

    page.click("#undo")  # back to nothing: the page asks for a digit again, without a request
    assert browser.settled()["strokes"] == "0"
    assert browser.result()["digit"] == "" and page.is_disabled("#undo")

    browser.draw_mouse(DIGITS["1"])
    browser.settled()
    sent = len(browser.requests)
    page.keyboard.press("Escape")
    state = browser.settled()
    res = browser.result()
    assert state["state"] == "idle" and state["strokes"] == "0"
    assert res["digit"] == "" and res["message"] == "Draw a digit" and res["input"] == "" and res["saliency"] == ""
    assert all(p == 0 for _, p in res["bars"])
    assert len(browser.requests) == sent, "clearing sent a request"
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # The canvas is repainted on the next animation frame (redrawSoon): wait for that frame, not forever.
    try:
        page.wait_for_function("""() => { const c = document.querySelector('#canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return d.every(v => v === 255); }""", timeout=5_000)  # fmt: skip
    except PlaywrightTimeout:
        pytest.fail("the canvas still has ink 5 s after clear")
    browser.check_clean()


@pytest.mark.parametrize(("kind", "digit"), [("touch", "1"), ("pen", "7")])
def test_touch_and_pen_draw(browser: Browser, kind: str, digit: str) -> None:
    browser.clear()
    browser.draw_cdp(DIGITS[digit], kind)
    state = browser.settled()
    assert kind in browser.page.evaluate("[...window.pointerTypes]")
    assert state["state"] == "ready" and browser.result()["digit"] == digit
    browser.check_clean()


def test_phone_width_fits(browser: Browser) -> None:
    page = browser.page
    page.set_viewport_size({"width": 375, "height": 740})
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        assert browser.box()["width"] <= 375
    finally:
        page.set_viewport_size({"width": 900, "height": 820})


@pytest.mark.parametrize("path, ready", [("/docs", ".swagger-ui .opblock"),
                                         ("/redoc", "[role=menuitem], .menu-content")])  # fmt: skip
def test_api_docs_load_offline_from_the_server(browser: Browser, path: str, ready: str) -> None:
    """Swagger UI and ReDoc are served by digitkit itself: nothing comes from a CDN, so they render offline. ReDoc's
    bundle asks for its logo from its CDN; the page's Content-Security-Policy stops that request in the browser."""
    page = browser.page.context.new_page()
    requests: list[str] = []
    blocked: set[str] = set()
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: blocked.add(r.url) if "csp" in (r.failure or "").lower() else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(browser.server.url + path)
        page.wait_for_selector(ready, timeout=20_000)
        assert "/v1/predict" in page.content()  # the operations were read from /openapi.json and drawn
    finally:
        page.close()
    local = (browser.server.url + "/", "data:", f"blob:{browser.server.url}/")
    foreign = [u for u in requests if not u.startswith(local) and u not in blocked]
    assert not foreign, f"{path} fetched from other hosts: {foreign}"
    assert any(u.endswith("/openapi.json") for u in requests), requests
    assert not errors, errors
