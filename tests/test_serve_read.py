"""/v1/read through a row reader (`digitkit serve --reader RUN`) on a real uvicorn server on 127.0.0.1: the answer,
the pattern, hostile input, the audit log, /v1/model, reload, startup checks, the ONNX engine, the old segmenting
reader without --reader, and the drawing page's Read number button in a real headless Chromium.

The row reader is the session's tiny `row_reader_run`: it reads little, so these tests check the plumbing (what
answers, in what shape, where it is logged), not what it reads."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving import Server, free_port, serve
from tests.test_webpage import CHROMIUM, CHROMIUM_ARGS, DIGITS, Browser

ADMIN = "test-admin-token-0123456789"
ADMIN_H = {"X-Admin-Token": ADMIN}
QUICK_S = 5.0
"""A hostile or oversized pattern is answered within this (the linear-time matcher takes milliseconds)."""


# ------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    from digitkit import data
    from tests.conftest import MNIST_DIR

    test = data.load_split(MNIST_DIR, "test")
    return test.images[:300, 0].numpy(), test.labels[:300].numpy()


def row_of(images: list[np.ndarray]) -> np.ndarray:
    """MNIST digits (white on black) side by side, a little apart, as dark ink on white paper."""
    row = np.concatenate([np.pad(im, ((6, 6), (3, 3))) for im in images], axis=1)
    return 255 - np.pad(row, ((0, 0), (6, 6)))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def rows(mnist_test) -> list[np.ndarray]:
    """Five rows of 3 to 7 digits, uint8 dark on white."""
    images, _ = mnist_test
    return [row_of([images[i] for i in range(s, s + n)]) for s, n in ((0, 3), (10, 4), (20, 5), (40, 6), (60, 7))]


def assert_error(r, status: int, word: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert "Traceback" not in r.text
    if word:
        assert word in str(body).lower(), body
    return body


def assert_row_reading(body: dict, image: np.ndarray, reader_version: str) -> None:
    """A row reader's answer in the ReadOut shape, every digit with a box inside the image."""
    assert body["reader"] == "sequence", body
    assert body["model_version"] == reader_version
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"]) and body["latency_ms"] >= 0
    assert re.fullmatch(r"[0-9]*", body["text"]), body["text"]
    assert 0.0 <= body["confidence"] <= 1.0 and 0.0 <= body["mean_confidence"] <= 1.0
    assert body["rejected"] is None or body["rejected"] in ("empty", "no-ink", "too-wide", "no-match", "low-confidence")
    assert body["complete"] == (body["rejected"] is None and bool(body["text"]))
    assert "record" not in body
    assert "".join(d["digit"] for d in body["digits"]) == body["text"]
    h, w = image.shape[:2]
    for d in body["digits"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (d, image.shape)
        assert 0.0 <= d["confidence"] <= 1.0


# ------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def reader_server(mnist_small_run: Path, row_reader_run: Path, tmp_path_factory) -> Iterator[Server]:
    """The digit classifier as --model, the row reader as --reader; admin routes on, no API key (the page test
    uses this server too)."""
    tmp = tmp_path_factory.mktemp("serve-read")
    with serve(mnist_small_run, tmp, "--reader", str(row_reader_run), "--audit-db", f"sqlite:///{tmp / 'audit.db'}",
               env={"DIGITKIT_ADMIN_TOKEN": ADMIN}) as srv:  # fmt: skip
        srv.db = tmp / "audit.db"
        yield srv


@pytest.fixture(scope="module")
def plain_server(mnist_small_run: Path, tmp_path_factory) -> Iterator[Server]:
    """No --reader: /v1/read cuts rows into digits for the classifier, as before row readers."""
    tmp = tmp_path_factory.mktemp("serve-segment")
    with serve(mnist_small_run, tmp, "--audit-db", f"sqlite:///{tmp / 'audit.db'}") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(reader_server):
    with reader_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def model_info(client) -> dict:
    r = client.get("/v1/model")
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ the answer
def test_read_answers_through_the_row_reader_in_every_input_form(client, model_info, rows):
    image = rows[1]
    raw = png(image)
    version = model_info["reader"]["version"]
    by_b64 = client.post("/v1/read", json={"image": b64(raw)})
    by_raw = client.post("/v1/read", content=raw, headers={"content-type": "image/png"})
    by_file = client.post("/v1/read", files={"file": ("row.png", raw, "image/png")})
    by_pixels = client.post("/v1/read", json={"pixels": image.astype(float).tolist()})
    for r in (by_b64, by_raw, by_file, by_pixels):
        assert r.status_code == 200, r.text
        assert_row_reading(r.json(), image, version)
    # The same bytes are read the same way, whatever carried them.
    assert by_b64.json()["text"] == by_raw.json()["text"] == by_file.json()["text"]
    assert by_b64.json()["digits"] == by_file.json()["digits"]


def test_boxes_stay_inside_every_row(client, model_info, rows):
    for image in rows:
        r = client.post("/v1/read", json={"image": b64(png(image))})
        assert r.status_code == 200, r.text
        assert_row_reading(r.json(), image, model_info["reader"]["version"])


def test_model_info_names_the_reader(model_info, row_reader_run: Path):
    from digitkit import checkpoint

    reader = model_info["reader"]
    sha = hashlib.sha256(checkpoint.resolve(row_reader_run).read_bytes()).hexdigest()
    assert reader["kind"] == "sequence" and reader["model"] == "crnn"
    assert reader["checkpoint_sha256"] == sha and reader["version"] == f"{reader['name']}-{sha[:12]}"
    assert reader["version"] != model_info["version"]  # the classifier still answers /v1/predict
    assert reader["contract"]["engine"] == "torch" and reader["contract"]["beam_width"] >= 1
    assert {"height", "max_width"} <= set(reader["contract"]["rows"]), reader["contract"]["rows"]
    assert "val_accuracy" in reader["metrics"]


def test_predict_still_answers_with_the_classifier(client, model_info, mnist_test):
    images, labels = mnist_test
    r = client.post("/v1/predict", json={"pixels": images[0].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == model_info["version"] and r.json()["digit"] == str(labels[0])


# ------------------------------------------------------------------------------------------ patterns
def test_pattern_is_honoured(client, rows):
    for image in rows[:3]:
        body = client.post("/v1/read", json={"image": b64(png(image)), "pattern": r"\d{3}"}).json()
        assert body["reader"] == "sequence" and body["pattern"] == r"\d{3}"
        if body["pattern_ok"]:
            assert re.fullmatch(r"\d{3}", body["text"]) and body["rejected"] in (None, "low-confidence"), body
        else:
            assert body["pattern_ok"] is False and body["rejected"] == "no-match" and not body["complete"], body


def test_a_pattern_no_digit_string_matches_is_no_match(client, rows):
    body = client.post("/v1/read", json={"image": b64(png(rows[0])), "pattern": "[a-z]+"}).json()
    assert body["rejected"] == "no-match" and body["pattern_ok"] is False and not body["complete"]
    assert "pattern" in body["why"]


def test_hostile_patterns_are_refused_or_cheap(client, rows):
    raw = b64(png(rows[4]))
    for pattern, word in (("1" * 201, "200"), (r"(\d)\1", "pattern"), ("(?=1)1", "pattern"), ("([", "pattern")):
        t0 = time.perf_counter()
        r = client.post("/v1/read", json={"image": raw, "pattern": pattern})
        assert time.perf_counter() - t0 < QUICK_S
        assert_error(r, 422, word)
    # Catastrophic for a backtracking regex engine; linear here (digitkit.realworld.pattern), so it is simply read:
    # no string of digits ends in x, so nothing matches.
    for pattern in (r"((\d+)+)+x", r"(\d|\d\d|\d{1,3})*x", r"(\d*)*" * 20 + "x"):
        t0 = time.perf_counter()
        r = client.post("/v1/read", json={"image": raw, "pattern": pattern})
        assert time.perf_counter() - t0 < QUICK_S, pattern
        assert r.status_code == 200, r.text
        assert r.json()["rejected"] == "no-match" and r.json()["pattern_ok"] is False


# ------------------------------------------------------------------------------------------ bad input
def test_non_images_are_422(client):
    assert_error(client.post("/v1/read", content=b"not an image at all", headers={"content-type": "image/png"}),
                 422, "unreadable")  # fmt: skip
    assert_error(client.post("/v1/read", json={"image": b64(b"GIF89a but not really")}), 422, "unreadable")
    assert_error(client.post("/v1/read", json={"image": "!!not base64!!"}), 422, "base64")
    assert_error(client.post("/v1/read", content=b"{", headers={"content-type": "application/json"}), 400)
    # The classifier's 28x28 model input means nothing to a row reader.
    assert_error(client.post("/v1/read", json={"pixels": [[0.0] * 28] * 28, "model_input": True}), 422,
                 "model_input")  # fmt: skip


def test_blank_image_is_an_answer_not_an_error(client, model_info):
    body = client.post("/v1/read", json={"image": b64(png(np.full((40, 120), 255, np.uint8)))}).json()
    assert body["reader"] == "sequence" and body["text"] == "" and body["rejected"] in ("empty", "no-ink")
    assert body["digits"] == [] and body["complete"] is False


# ------------------------------------------------------------------------------------------ audit, reload
def test_the_audit_log_has_the_reads(client, reader_server, model_info, rows):
    answers = [client.post("/v1/read", json={"image": b64(png(image)), "pattern": p}).json()
               for image, p in ((rows[2], None), (rows[3], "[a-z]"))]  # fmt: skip
    with sqlite3.connect(reader_server.db) as db:
        for a in answers:
            got = db.execute("SELECT route, model_version, digit, confidence, rejected, input_sha256 FROM predictions "
                             "WHERE request_id=?", (a["request_id"],)).fetchone()  # fmt: skip
            assert got is not None, a
            assert got[:5] == ("read", model_info["reader"]["version"], a["text"] or None, a["confidence"],
                               a["rejected"])  # fmt: skip
            assert len(got[5]) == 64
        before = db.execute("SELECT count(*) FROM predictions WHERE route='read' AND rejected='unreadable'").fetchone()
    assert client.post("/v1/read", content=b"nope", headers={"content-type": "image/png"}).status_code == 422
    with sqlite3.connect(reader_server.db) as db:
        after = db.execute("SELECT count(*) FROM predictions WHERE route='read' AND rejected='unreadable'").fetchone()
    assert after[0] == before[0] + 1  # an unreadable attempt is logged too, as /v1/predict logs one


def test_reload_with_a_model_keeps_the_reader(reader_server, model_info, mnist_small_run, rows):
    with reader_server.client(headers=ADMIN_H) as c:
        r = c.post("/v1/admin/reload", json={"model": str(mnist_small_run)})
        assert r.status_code == 200, r.text
        assert r.json()["reader"]["version"] == model_info["reader"]["version"]
        assert r.json()["version"] == model_info["version"]
        assert c.get("/v1/model").json()["reader"] == model_info["reader"]
        body = c.post("/v1/read", json={"image": b64(png(rows[0]))}).json()
        assert body["reader"] == "sequence" and body["model_version"] == model_info["reader"]["version"]


# ------------------------------------------------------------------------------------------ startup
def run_serve(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "digitkit", "serve", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_reader_that_is_not_a_row_reader_fails_at_startup(mnist_small_run, tmp_path):
    done = run_serve("--model", str(mnist_small_run), "--reader", str(mnist_small_run))
    assert done.returncode == 2, done.stderr
    assert "not a row reader" in done.stderr and "configs/read.yaml" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"reader: {mnist_small_run}\n")
    done = run_serve("--model", str(mnist_small_run), "--settings", str(settings))
    assert done.returncode == 2 and "not a row reader" in done.stderr, done.stderr
    done = run_serve("--model", str(mnist_small_run), "--reader", str(tmp_path / "missing"))
    assert done.returncode == 2 and "reader" in done.stderr and "no such checkpoint" in done.stderr, done.stderr


def test_a_row_reader_as_the_model_fails_at_startup(row_reader_run):
    done = run_serve("--model", str(row_reader_run))
    assert done.returncode == 2, done.stderr
    assert "a row reader" in done.stderr and "--reader" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------ without a reader
def test_without_a_reader_the_model_reads_the_digits(plain_server, mnist_test):
    images, labels = mnist_test
    with plain_server.client() as c:
        info = c.get("/v1/model").json()
        assert info["reader"] == {"kind": "segment", "name": info["name"], "version": info["version"]}
        r = c.post("/v1/read", json={"image": b64(png(row_of([images[i] for i in range(3)]))), "pattern": "[0-9]{3}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reader"] == "segment" and body["model_version"] == info["version"]
    assert body["text"] == "".join(str(v) for v in labels[:3]) and body["pattern_ok"] and body["complete"]
    assert all("rejected" in d and "probabilities" in d for d in body["digits"])  # the classifier's answer per digit


# ------------------------------------------------------------------------------------------ ONNX
def test_onnx_reader_reads_as_torch_does(mnist_small_run, row_reader_run, reader_server, rows, tmp_path):
    from digitkit import data
    from digitkit.export import ExportOptions, export_run
    from tests.conftest import MNIST_DIR

    # Copies, so that the session's run folders stay as other tests expect them (no export/ in them).
    model = tmp_path / "model"
    reader = tmp_path / "reader"
    shutil.copytree(mnist_small_run, model, ignore=shutil.ignore_patterns("serve", "export"))
    shutil.copytree(row_reader_run, reader, ignore=shutil.ignore_patterns("serve", "export"))
    # --engine onnx serves the classifier from its export too (its parity checked on 500 test digits, not 10,000)
    parity = tmp_path / "parity-data"
    test = data.load_split(MNIST_DIR, "test")
    data.save_split(test.subset(list(range(500))), parity, "test")
    data.save_split(test.subset(list(range(500, 600))), parity, "train")
    export_run(model, options=ExportOptions(measure_speed=False), data_dir=parity)
    done = run_serve("--model", str(model), "--reader", str(reader), "--engine", "onnx")
    assert done.returncode == 2, done.stderr  # the reader is not exported yet: one clear line, before uvicorn starts
    assert "reader:" in done.stderr and "export/model.onnx" in done.stderr and "digitkit export" in done.stderr
    export_run(reader, options=ExportOptions(measure_speed=False))

    images = [png(image) for image in rows]
    with reader_server.client() as c:
        torch_answers = [c.post("/v1/read", json={"image": b64(raw)}).json() for raw in images]
    with serve(model, tmp_path, "--reader", str(reader), "--engine", "onnx") as srv, srv.client() as c:
        info = c.get("/v1/model").json()["reader"]
        onnx_answers = [c.post("/v1/read", json={"image": b64(raw)}).json() for raw in images]
    assert info["contract"]["engine"] == "onnx" and info["contract"]["onnx_file"].endswith("model.onnx")
    assert info["version"].endswith("-onnx")
    for image, t, o in zip(rows, torch_answers, onnx_answers, strict=True):
        assert_row_reading(o, image, info["version"])
        assert o["text"] == t["text"] and o["rejected"] == t["rejected"]
        assert [d["box"] for d in o["digits"]] == [d["box"] for d in t["digits"]]
        assert o["confidence"] == pytest.approx(t["confidence"], abs=1e-4)


# ------------------------------------------------------------------------------------------ the drawing page
def in_column(strokes: list[list[tuple[float, float]]], k: int, n: int = 3) -> list[list[tuple[float, float]]]:
    """A digit drawn for the whole canvas, shrunk into column k of n (a row of n digits across the canvas)."""
    return [[((k + 0.12 + 0.76 * x) / n, 0.25 + 0.5 * y) for x, y in stroke] for stroke in strokes]


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        reason = f"{CHROMIUM} is missing (apt install chromium); the drawing page needs a real browser"
        if os.environ.get("DIGITKIT_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(chromium, server: Server) -> Browser:
    context = chromium.new_context(viewport={"width": 900, "height": 820})
    page = context.new_page()
    b = Browser(page, server)
    page.on("request", lambda r: b.requests.append(r.url))
    page.on("console", lambda m: b.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: b.console_errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("() => document.body.dataset.loaded === '1'")
    return b


def read_on_page(b: Browser) -> dict:
    page = b.page
    assert page.is_hidden("#reading") and page.is_disabled("#read")
    for k, digit in enumerate("174"):
        b.draw_mouse(in_column(DIGITS[digit], k))
    state = b.settled()  # the single-digit answer as before: the page predicts while drawing
    assert state["state"] == "ready" and state["strokes"] == str(sum(len(DIGITS[d]) for d in "174"))
    assert page.text_content("#digit") != ""
    page.click("#read")
    page.wait_for_function("() => { const d = document.body.dataset; "
                           "return d.reading === 'done' && d.readFor === d.drawing; }", timeout=15_000)  # fmt: skip
    assert page.is_visible("#reading")
    return page.evaluate("""() => ({
        text: document.querySelector('#read-text').textContent,
        confidence: document.querySelector('#read-confidence').textContent,
        message: document.querySelector('#read-message').textContent,
        status: document.querySelector('#read-status').textContent,
        boxes: +document.querySelector('#read-boxes').dataset.boxes,
        info: document.querySelector('#model-info').textContent,
    })""")


def test_page_reads_a_drawn_number_with_the_row_reader(chromium, reader_server, model_info):
    b = open_page(chromium, reader_server)
    try:
        shown = read_on_page(b)
        assert "row reader" in shown["info"]
        assert "row reader" in shown["status"] and model_info["reader"]["version"] in shown["status"]
        text = shown["text"]
        assert re.fullmatch(r"[0-9]+|\u2013", text), shown
        assert shown["boxes"] == (0 if text == "\u2013" else len(text))
        assert shown["message"] or "sure of the number" in shown["confidence"], shown
        # The page's read went through /v1/read and nothing else changed: one more stroke hides the stale reading.
        assert any(u.endswith("/v1/read") for u in b.requests)
        b.draw_mouse([[(0.1, 0.9), (0.2, 0.9)]])
        b.settled()
        assert b.page.is_hidden("#reading") and b.page.evaluate("document.body.dataset.reading") == "idle"
        b.check_clean()
    finally:
        b.page.context.close()


def test_page_reads_a_drawn_number_without_a_row_reader(chromium, plain_server):
    b = open_page(chromium, plain_server)
    try:
        shown = read_on_page(b)
        assert "row reader" not in shown["info"] and "digits cut out" in shown["status"]
        assert shown["text"] and shown["boxes"] == len(shown["text"].replace("\u2013", ""))
        b.check_clean()
    finally:
        b.page.context.close()
