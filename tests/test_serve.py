"""The REST API on a real uvicorn server on 127.0.0.1: every route, every input form, auth, limits, cache, audit,
metrics and drift. The page itself is tested in tests/test_webpage.py; fuzzing, SIGKILL and workers in
tests/test_serve_robustness.py."""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.serving import serve

API_KEY = "test-api-key-0123456789"
ADMIN = "test-admin-token-0123456789"
KEY = {"X-API-Key": API_KEY}
ADMIN_H = {"X-Admin-Token": ADMIN}


@pytest.fixture(scope="module")
def digits(mnist_test_small):
    """Ten MNIST test images (one per class) as (label, uint8 28x28)."""
    images, labels = mnist_test_small
    out = []
    for k in range(10):
        i = int((labels == k).nonzero()[0][0])
        out.append((str(k), images[i]))
    return out


@pytest.fixture(scope="module")
def mnist_test_small():
    from digitkit import data
    from tests.conftest import MNIST_DIR

    test = data.load_split(MNIST_DIR, "test")
    return test.images[:200, 0].numpy(), test.labels[:200].numpy()


@pytest.fixture(scope="module")
def server(mnist_small_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    settings = tmp / "settings.yaml"
    settings.write_text("limits:\n  max_request_bytes: 2000000\n  max_batch: 16\n  max_image_pixels: 4000000\n"
                        "drift:\n  window: 60\n  min_samples: 40\n  check_every: 10\n")  # fmt: skip
    env = {"DIGITKIT_API_KEY": API_KEY, "DIGITKIT_ADMIN_TOKEN": ADMIN}
    with serve(mnist_small_run, tmp, "--settings", str(settings), "--audit-db", f"sqlite:///{tmp / 'audit.db'}",
               env=env) as srv:  # fmt: skip
        srv.db = tmp / "audit.db"
        yield srv


@pytest.fixture
def client(server):
    with server.client(headers=KEY) as c:
        yield c


def png(image: np.ndarray, invert: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(255 - image if invert else image).save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def assert_error(r, status: int, word: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert "Traceback" not in r.text
    if word:
        assert word in json.dumps(body).lower(), body
    return body


# ---------------------------------------------------------------------------------------------- predict
def test_predict_three_input_forms_agree_and_are_right(client, digits):
    label, image = digits[7]
    by_file = client.post("/v1/predict", files={"file": ("seven.png", png(image, invert=True), "image/png")})
    by_b64 = client.post("/v1/predict", json={"image": b64(png(image, invert=True))})
    by_raw = client.post("/v1/predict", content=png(image, invert=True), headers={"content-type": "image/png"})
    by_pixels = client.post("/v1/predict", json={"pixels": image.tolist()})
    for r in (by_file, by_b64, by_raw, by_pixels):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["digit"] == label and body["rejected"] is None
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-4
        assert body["confidence"] == max(body["probabilities"])
        assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
        assert body["model_version"].endswith(body["model_version"][-12:]) and body["latency_ms"] >= 0
    # The same bytes are the same input: the file and base64 forms share a cache entry, with the same answer.
    assert by_b64.json()["cached"] and by_b64.json()["probabilities"] == by_file.json()["probabilities"]
    # Pixels (white on black, as MNIST) and the inverted PNG are different inputs but the same digit after
    # preprocessing: the same 28x28 model input.
    assert by_pixels.json()["digit"] == by_file.json()["digit"]


def test_predict_data_url_top_k_and_returned_input(client, digits):
    label, image = digits[4]
    r = client.post("/v1/predict", json={"image": "data:image/png;base64," + b64(png(image)), "top_k": 5,
                                         "return_input": True})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["digit"] == label
    assert len(body["top_k"]) == 5 and body["top_k"][0] == {"digit": label, "probability": body["confidence"]}
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_png"])))
    assert seen.size == (28, 28) and np.asarray(seen).max() > 200  # white digit on black, as the model saw it


def test_predict_matches_the_cli_path(client, digits, mnist_small_run):
    """The server answers exactly what `digitkit predict` (the Recognizer) answers for the same bytes."""
    from digitkit.classify import Recognizer

    rec = Recognizer.open(mnist_small_run)
    for _label, image in digits[:4]:
        raw = png(image, invert=True)
        r = client.post("/v1/predict", json={"image": b64(raw), "top_k": 10}).json()
        a = rec.predict([raw], top_k=10)[0]
        assert r["digit"] == a.digit and r["probabilities"] == pytest.approx(a.probabilities, abs=1e-5)


def test_model_input_pixels_skip_preprocessing(client, digits):
    label, image = digits[2]
    r = client.post("/v1/predict", json={"pixels": (image / 255).tolist(), "model_input": True, "return_input": True})
    assert r.status_code == 200 and r.json()["digit"] == label
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["input_png"]))))
    assert np.abs(seen.astype(int) - image.astype(int)).max() <= 1  # exactly what was sent
    assert_error(client.post("/v1/predict", json={"pixels": [[0] * 20] * 20, "model_input": True}), 422, "28x28")
    assert_error(client.post("/v1/predict", json={"image": b64(png(image)), "model_input": True}), 422, "pixels")


def test_rejections_are_answers_not_errors(client):
    blank = np.zeros((28, 28), np.uint8)
    r = client.post("/v1/predict", json={"pixels": blank.tolist()})
    assert r.status_code == 200 and r.json()["digit"] is None and r.json()["rejected"] == "empty"
    blob = np.zeros((28, 28), np.uint8)
    blob[8:20, 8:20] = 255
    r = client.post("/v1/predict", json={"pixels": blob.tolist()})
    assert r.status_code == 200 and r.json()["rejected"] == "not-a-digit"


def test_batch_in_order_with_per_item_errors(client, mnist_test_small):
    images, labels = mnist_test_small
    items = [{"pixels": images[i].tolist()} for i in range(12)]
    items.insert(5, {"image": b64(b"this is not an image")})
    r = client.post("/v1/predict/batch", json={"images": items, "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert r.json()["count"] == len(results) == 13
    assert results[5]["rejected"] == "unreadable" and "not an image" in results[5]["error"]
    answered = [res for j, res in enumerate(results) if j != 5]
    right = sum(res["digit"] == str(labels[i]) for i, res in enumerate(answered))
    assert right >= 11 and all(len(res["top_k"]) <= 2 for res in answered)
    assert len({res["request_id"] for res in results}) == 13  # each image can get its own feedback


def test_batch_multipart_files(client, digits):
    chosen = [digits[k] for k in (0, 1, 2, 4)]
    files = [("files", (f"{label}.png", png(image, invert=True), "image/png")) for label, image in chosen]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    assert [res["digit"] for res in r.json()["results"]] == [label for label, _ in chosen]


def test_batch_limits(client, digits):
    items = [{"pixels": digits[0][1].tolist()}] * 17
    assert_error(client.post("/v1/predict/batch", json={"images": items}), 413, "max_batch")
    assert_error(client.post("/v1/predict/batch", json={"images": []}), 422, "empty")
    assert_error(client.post("/v1/predict/batch", content=png(digits[0][1]), headers={"content-type": "image/png"}),
                 415)  # fmt: skip


def test_read_a_row_of_digits(client, digits):
    row = np.concatenate([digits[k][1] for k in (4, 0, 2, 1)], axis=1)
    raw = png(np.pad(row, 8), invert=True)
    r = client.post("/v1/read", json={"image": b64(raw), "pattern": "[0-9]{4}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "4021" and body["pattern_ok"] and body["complete"] and len(body["digits"]) == 4
    assert_error(client.post("/v1/read", json={"image": b64(raw), "pattern": "(["}), 422, "regular expression")


def test_explain_returns_overlays(client, digits):
    label, image = digits[5]
    r = client.post("/v1/explain", json={"pixels": image.tolist(), "methods": ["saliency", "gradcam"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["digit"] == label and set(body["overlays"]) == {"saliency", "gradcam"} and not body["overlay_errors"]
    for blob in body["overlays"].values():
        img = Image.open(io.BytesIO(base64.b64decode(blob)))
        assert img.size == (28, 28) and img.mode == "RGB"
    assert_error(client.post("/v1/explain", json={"pixels": image.tolist(), "methods": ["magic"]}), 422)


# ------------------------------------------------------------------------------------- feedback and audit
def test_feedback_feeds_live_accuracy_and_the_audit_log(server, client, digits):
    ids = {}
    for label, image in digits[:3]:
        ids[label] = client.post("/v1/predict", json={"pixels": image.tolist(), "top_k": 1}).json()
    wrong_label = "9" if ids["0"]["digit"] != "9" else "8"
    assert client.post("/v1/feedback", json={"request_id": ids["0"]["request_id"], "true_label": wrong_label}
                       ).json()["correct"] is False  # fmt: skip
    r = client.post("/v1/feedback", json={"request_id": ids["1"]["request_id"], "true_label": "1"})
    assert r.status_code == 200 and r.json() == {"request_id": ids["1"]["request_id"], "true_label": "1",
                                                 "predicted": ids["1"]["digit"], "correct": ids["1"]["digit"] == "1"}
    assert_error(client.post("/v1/feedback", json={"request_id": "f" * 32, "true_label": "1"}), 404, "request_id")
    assert_error(client.post("/v1/feedback", json={"request_id": ids["2"]["request_id"], "true_label": "x"}), 422)
    metrics = client.get("/metrics").text
    labelled = _metric(metrics, "digitkit_labelled_predictions")
    assert labelled >= 2
    assert 0 <= _metric(metrics, "digitkit_live_accuracy") < 1  # one of them was labelled wrong on purpose
    with sqlite3.connect(server.db) as db:
        row = db.execute("SELECT digit, true_label, input_sha256, model_version FROM predictions WHERE request_id=?",
                         (ids["1"]["request_id"],)).fetchone()  # fmt: skip
    assert row[0] == ids["1"]["digit"] and row[1] == "1" and len(row[2]) == 64 and row[3] == ids["1"]["model_version"]


def test_every_answer_is_in_the_audit_log(server, client, mnist_test_small):
    images, _ = mnist_test_small
    r = client.post("/v1/predict/batch", json={"images": [{"pixels": images[i].tolist()} for i in range(100, 110)]})
    ids = [res["request_id"] for res in r.json()["results"]]
    with sqlite3.connect(server.db) as db:
        found = {row[0] for row in db.execute(
            f"SELECT request_id FROM predictions WHERE request_id IN ({','.join('?' * len(ids))})", ids)}  # fmt: skip
    assert found == set(ids)


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


# ------------------------------------------------------------------------------------- info and metrics
def test_model_health_ready_and_openapi(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        info = c.get("/v1/model").json()
        assert info["classes"] == [str(k) for k in range(10)] and len(info["checkpoint_sha256"]) == 64
        assert info["version"].endswith(info["checkpoint_sha256"][:12])
        assert info["contract"]["model_input_shape"] == [1, 1, 28, 28] and "preprocess" in info["contract"]
        assert abs(sum(info["drift_baseline"]["class_distribution"].values()) - 1) < 1e-3
        spec = c.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/predict/batch", "/v1/read", "/v1/explain", "/v1/feedback", "/v1/model",
                "/metrics"} <= set(spec["paths"])  # fmt: skip


def test_metrics_count_requests_classes_rejections_and_cache(client, digits):
    before = client.get("/metrics").text
    image = digits[6][1]
    blank = np.zeros((28, 28)).tolist()
    for _ in range(3):
        client.post("/v1/predict", json={"pixels": image.tolist()})
    client.post("/v1/predict", json={"pixels": blank})
    after = client.get("/metrics").text

    def delta(name: str, labels: str = "") -> float:
        try:
            old = _metric(before, name, labels)
        except AssertionError:
            old = 0.0
        return _metric(after, name, labels) - old

    assert delta("digitkit_requests_total", '{route="/v1/predict",status="200"}') == 4
    assert delta("digitkit_predictions_total", '{digit="6"}') == 3
    assert delta("digitkit_rejections_total", '{reason="empty"}') == 1
    assert delta("digitkit_cache_hits_total") >= 2  # the second and third identical image
    assert delta("digitkit_request_latency_seconds_count", '{route="/v1/predict"}') == 4
    assert "digitkit_drift_alert" in after and "digitkit_window_mean_confidence" in after


def test_drift_alert_when_traffic_is_all_one_digit(server, client, mnist_test_small):
    """A window of only 1s is far from the baseline's class mix: the class-shift gauge goes to 1 and a warning is
    logged. (The module's settings: window 60, min 40, checked every 10.)"""
    images, labels = mnist_test_small
    ones = [images[i] for i in np.flatnonzero(labels == 1)]
    rng = np.random.default_rng(0)
    for i in range(70):
        noisy = np.clip(ones[i % len(ones)].astype(int) + rng.integers(0, 3, (28, 28)), 0, 255)  # distinct inputs
        client.post("/v1/predict", json={"pixels": noisy.tolist()})
    metrics = client.get("/metrics").text
    assert _metric(metrics, "digitkit_drift_alert", '{signal="class_shift"}') == 1
    assert _metric(metrics, "digitkit_drift_value", '{signal="class_shift"}') > 0.25
    assert "drift: class_shift" in server.log()


# ------------------------------------------------------------------------------------- cache
def test_cache_never_changes_an_answer(client, mnist_test_small):
    images, _ = mnist_test_small
    for i in range(150, 160):
        first = client.post("/v1/predict", json={"pixels": images[i].tolist(), "top_k": 10}).json()
        second = client.post("/v1/predict", json={"pixels": images[i].tolist(), "top_k": 10}).json()
        assert second["cached"]
        for key in ("digit", "confidence", "probabilities", "rejected", "top_k", "predicted"):
            assert first[key] == second[key]
        assert first["request_id"] != second["request_id"]
    # top_k is applied after the cache: a smaller top_k of a cached answer is its prefix.
    third = client.post("/v1/predict", json={"pixels": images[150].tolist(), "top_k": 1}).json()
    assert third["cached"] and len(third["top_k"]) == 1


# ------------------------------------------------------------------------------------- auth and admin
def test_api_key_required_and_never_logged(server, digits):
    body = {"pixels": digits[1][1].tolist()}
    with server.client() as c:
        assert_error(c.post("/v1/predict", json=body), 401, "missing")
        r = c.post("/v1/predict", json=body, headers={"X-API-Key": "wrong-key-123456"})
        assert_error(r, 401, "wrong")
        assert c.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert c.get("/v1/model").status_code == 200  # information routes are open
    assert API_KEY not in server.log() and ADMIN not in server.log()


def test_admin_routes(server, client, tmp_path, mnist_small_run):
    assert_error(client.post("/v1/admin/reload"), 401)  # the API key is not the admin token
    with server.client(headers=ADMIN_H) as admin:
        r = admin.get("/v1/admin/audit/export", params={"format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.text.splitlines()[0].startswith("request_id") and len(r.text.splitlines()) > 5
        lines = admin.get("/v1/admin/audit/export", params={"format": "jsonl"}).text.splitlines()
        assert all("request_id" in json.loads(line) for line in lines)
        assert_error(admin.get("/v1/admin/audit/export", params={"format": "xml"}), 422)
        stats = admin.get("/v1/admin/audit/stats").json()
        assert stats["total"] >= len(lines) - 5
        # A bad model path: 422, and the old model keeps serving.
        assert_error(admin.post("/v1/admin/reload", json={"model": str(tmp_path / "nope")}), 422, "keeps serving")
        version = admin.get("/v1/model").json()["version"]
        r = admin.post("/v1/admin/reload", json={})
        assert r.status_code == 200 and r.json()["version"] == version
    # The reload emptied the cache: the same input is computed again, with the same answer.
    body = {"pixels": np.eye(28, dtype=int).tolist()}
    assert client.post("/v1/predict", json=body).status_code == 200


def test_admin_routes_disabled_without_token(mnist_small_run, tmp_path):
    with serve(mnist_small_run, tmp_path, "--audit-db", f"sqlite:///{tmp_path / 'a.db'}") as srv, srv.client() as c:
        assert_error(c.post("/v1/admin/reload", headers=ADMIN_H), 403, "admin token")
        # No API key configured: prediction routes are open.
        assert c.post("/v1/predict", json={"pixels": np.zeros((28, 28)).tolist()}).status_code == 200


# ------------------------------------------------------------------------------------- bad input
def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # PIL identifies a PNG once it reaches the first IDAT chunk: an empty one is enough to declare the size.
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b""))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs", "status", "word"),
    [
        ("not an image", {"content": b"hello world", "headers": {"content-type": "image/png"}}, 422, "not an image"),
        ("truncated png", {"content": "TRUNCATED", "headers": {"content-type": "image/png"}}, 422, None),
        ("zero-size png", {"content": _png_header_only(0, 0), "headers": {"content-type": "image/png"}}, 422, None),
        ("pixel bomb", {"content": _png_header_only(20000, 20000), "headers": {"content-type": "image/png"}}, 413,
         "pixels"),
        ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 422, "empty"),
        ("wrong type", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
        ("no type", {"content": b"x"}, 415, None),
        ("bad json", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "json"),
        ("nan pixels", {"content": b'{"pixels": [[NaN, 1], [1, 1]]}', "headers": {"content-type": "application/json"}},
         400, "nan"),
        ("huge pixels", {"json": {"pixels": [[1e9]]}}, 422, "0-255"),
        ("ragged pixels", {"json": {"pixels": [[1, 2], [3]]}}, 422, "rectangle"),
        ("empty pixels", {"json": {"pixels": []}}, 422, "rectangle"),
        ("both fields", {"json": {"pixels": [[1]], "image": "aGk="}}, 422, "exactly one"),
        ("neither field", {"json": {}}, 422, "exactly one"),
        ("unknown field", {"json": {"pixels": [[1]], "colour": 1}}, 422, None),
        ("json list", {"json": [1, 2, 3]}, 422, None),
        ("wrong type field", {"json": {"pixels": "abc"}}, 422, None),
        ("bad base64", {"json": {"image": "not base64!!"}}, 422, "base64"),
        ("multipart without file", {"files": {"a": (None, "b")}}, 422, "no file"),
        ("form-urlencoded", {"data": {"a": "b"}}, 415, "content-type"),
        ("too large", {"content": b"0" * 2_100_000, "headers": {"content-type": "image/png"}}, 413,
         "max_request_bytes"),
    ],
)
def test_bad_requests_are_4xx_json_and_the_server_keeps_serving(client, digits, name, kwargs, status, word):
    if kwargs.get("content") == "TRUNCATED":
        kwargs = {**kwargs, "content": png(digits[0][1])[:60]}
    r = client.post("/v1/predict", **kwargs)
    assert_error(r, status, word)
    assert client.post("/v1/predict", json={"pixels": digits[8][1].tolist()}).json()["digit"] == "8"


def test_a_real_decompression_bomb_is_refused_before_decoding(client):
    """20000 x 20000 gray PNG of zeros: 400 MB decoded, 400 KB on the wire."""
    comp = zlib.compressobj(9)
    row = b"\x00" * 20001
    idat = b"".join(comp.compress(row) for _ in range(20000)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    bomb = head + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    assert len(bomb) < 2_000_000
    assert_error(client.post("/v1/predict", files={"file": ("bomb.png", bomb, "image/png")}), 413, "pixels")
    r = client.post("/v1/predict/batch", json={"images": [{"image": b64(bomb)}, {"pixels": [[0, 255], [255, 0]]}]})
    assert r.status_code == 200 and r.json()["results"][0]["rejected"] == "unreadable"
    assert "limit" in r.json()["results"][0]["error"]


def test_request_timeout_is_408(mnist_small_run, tmp_path, digits):
    settings = tmp_path / "s.yaml"
    settings.write_text("limits:\n  request_timeout_s: 0.001\n")  # (event-loop timers count whole milliseconds)
    with serve(mnist_small_run, tmp_path, "--settings", str(settings), "--audit-db",
               f"sqlite:///{tmp_path / 'a.db'}") as srv, srv.client() as c:  # fmt: skip
        # 1,008 x 1,008: the full path takes tens of milliseconds, far over the limit
        big = np.kron(digits[0][1], np.ones((36, 36), np.uint8))
        assert_error(c.post("/v1/predict", content=png(big), headers={"content-type": "image/png"}), 408,
                     "request_timeout_s")  # fmt: skip
        assert c.get("/healthz").status_code == 200


def test_settings_errors_are_one_line(mnist_small_run, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_batch: 0\n")
    key_in_file = tmp_path / "key.yaml"
    key_in_file.write_text("api_key: secret-secret\n")
    for args, word in ((["--settings", str(bad)], "max_batch"), (["--settings", str(key_in_file)], "DIGITKIT_API_KEY"),
                       (["--model", str(tmp_path / "missing")], "no such")):  # fmt: skip
        cmd = [sys.executable, "-m", "digitkit", "serve", "--port", "0"] + (["--model", str(mnist_small_run)]
                                                                             if "--model" not in args else []) + args
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_previews_are_audited_but_kept_out_of_drift(server, client, digits):
    before = client.get("/metrics").text
    r = client.post("/v1/predict", json={"pixels": (digits[0][1] // 2 + 1).tolist(), "preview": True})
    assert r.status_code == 200
    with sqlite3.connect(server.db) as db:
        route = db.execute("SELECT route FROM predictions WHERE request_id=?", (r.json()["request_id"],)).fetchone()
    assert route == ("preview",)
    after = client.get("/metrics").text
    # The drift window did not move (its mean confidence is unchanged), while the request was counted.
    assert _metric(after, "digitkit_window_mean_confidence") == _metric(before, "digitkit_window_mean_confidence")
    assert _metric(after, "digitkit_requests_total", '{route="/v1/predict",status="200"}') > _metric(
        before, "digitkit_requests_total", '{route="/v1/predict",status="200"}')


def test_baseline_is_stored_with_the_model_and_tied_to_its_checkpoint(server, mnist_small_run):
    from digitkit import runs
    from digitkit.serve.drift import load_baseline

    opened = runs.open_model(mnist_small_run)
    sha = runs.checkpoint_sha256(opened.checkpoint_path)
    stored = load_baseline(mnist_small_run, sha)
    assert stored is not None and stored.images > 0 and "validation" in stored.source
    assert load_baseline(mnist_small_run, "0" * 64) is None  # another checkpoint: recomputed, never reused


def test_a_fallback_baseline_is_never_stored_and_is_measured_once_the_data_is_there(mnist_small_run, tmp_path):
    """Started where the run's data folder does not exist, the server serves with the uniform fallback, says so and
    stores nothing; a fallback stored by an older version is not trusted; once the data is there, a reload measures
    the real baseline and stores it."""
    import shutil

    import torch

    from digitkit import checkpoint, runs
    from digitkit.serve.drift import BASELINE_FILE, FALLBACK_SOURCE
    from tests.conftest import MNIST_DIR

    run = tmp_path / "run"
    shutil.copytree(mnist_small_run, run, ignore=shutil.ignore_patterns(BASELINE_FILE, "serve"))
    data_dir = tmp_path / "mnist"  # does not exist yet
    ckpt_path = checkpoint.resolve(run)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["config"]["data"]["dir"] = str(data_dir)  # where the model says its data is
    torch.save(ckpt, ckpt_path)
    sha = runs.checkpoint_sha256(ckpt_path)
    measured = re.compile(r"^digitkit_drift_baseline_measured (\S+)$", re.M)
    with serve(run, tmp_path, "--audit-db", str(tmp_path / "audit.db"), env={"DIGITKIT_ADMIN_TOKEN": ADMIN}) as srv, \
            srv.client() as c:  # fmt: skip
        base = c.get("/v1/model").json()["drift_baseline"]
        assert base["measured"] is False and base["source"] == FALLBACK_SOURCE and base["images"] == 0, base
        assert not (run / BASELINE_FILE).exists()
        assert measured.search(c.get("/metrics").text)[1] == "0.0"
        assert "no reference data for the drift baseline" in srv.log() and str(data_dir) in srv.log()

        # What older versions stored in this situation: a fallback saved as if measured.
        old = {"class_distribution": {str(k): 0.1 for k in range(10)}, "mean_confidence": 0.9, "rejection_rate": 0.0,
               "images": 0, "source": FALLBACK_SOURCE, "checkpoint_sha256": sha}  # fmt: skip
        (run / BASELINE_FILE).write_text(json.dumps(old))
        assert c.post("/v1/admin/reload", headers=ADMIN_H).status_code == 200  # still no data
        assert c.get("/v1/model").json()["drift_baseline"]["measured"] is False
        assert json.loads((run / BASELINE_FILE).read_text()) == old  # not trusted, and not written over

        data_dir.symlink_to(MNIST_DIR, target_is_directory=True)  # the data arrives
        assert c.post("/v1/admin/reload", headers=ADMIN_H).status_code == 200
        base = c.get("/v1/model").json()["drift_baseline"]
        assert base["measured"] is True and base["images"] > 0 and "validation images" in base["source"], base
        assert measured.search(c.get("/metrics").text)[1] == "1.0"
    stored = json.loads((run / BASELINE_FILE).read_text())
    assert stored["measured"] is True and stored["checkpoint_sha256"] == sha and stored["images"] == base["images"]
    assert abs(sum(stored["class_distribution"].values()) - 1) < 1e-3 and stored["class_distribution"] != \
        old["class_distribution"]  # fmt: skip


def test_baseline_files_a_fallback_is_never_saved_nor_loaded(tmp_path):
    from digitkit.serve import drift
    from digitkit.serve.drift import BASELINE_FILE, FALLBACK_SOURCE, Baseline, load_baseline, save_baseline

    sha = "a" * 64
    fallback = drift.uniform_baseline(["0", "1", "2", "3"])
    assert not fallback.measured and fallback.images == 0 and fallback.class_distribution["2"] == 0.25
    save_baseline(fallback, tmp_path, sha)
    assert not (tmp_path / BASELINE_FILE).exists()

    real = Baseline({"0": 0.25, "1": 0.25, "2": 0.25, "3": 0.25}, 0.97, 0.01, 400, "400 validation images of x")
    save_baseline(real, tmp_path, sha)
    assert json.loads((tmp_path / BASELINE_FILE).read_text())["measured"] is True
    assert load_baseline(tmp_path, sha) == real

    def old_file(**changes) -> Baseline | None:
        raw = {"class_distribution": real.class_distribution, "mean_confidence": 0.97, "rejection_rate": 0.01,
               "images": 400, "source": "400 validation images of x", "checkpoint_sha256": sha, **changes}
        (tmp_path / BASELINE_FILE).write_text(json.dumps(raw))
        return load_baseline(tmp_path, sha)

    assert old_file() == real  # written before `measured` existed, and measured: kept
    assert old_file(images=0, source=FALLBACK_SOURCE) is None  # a fallback an older version stored
    assert old_file(source=FALLBACK_SOURCE) is None
    assert old_file(measured=False) is None


# ------------------------------------------------------------------------------------- in-process units
def test_drift_monitor_signals_cross_and_recover():
    from digitkit.serve.drift import Baseline, DriftMonitor
    from digitkit.serve.settings import DriftSettings

    base = Baseline({str(k): 0.1 for k in range(10)}, mean_confidence=0.95, rejection_rate=0.02, images=100,
                    source="test", latency_ms=2.0)  # fmt: skip
    mon = DriftMonitor(base, DriftSettings(window=100, min_samples=50, check_every=10))
    for i in range(100):  # balanced, confident, fast: nothing crosses
        mon.observe(str(i % 10), 0.95, 2.0)
    assert not any(mon.alerts.values()) and mon.values["class_shift"] < 0.05
    for i in range(100):  # unsure, often rejected, slow
        mon.observe(None if i % 3 == 0 else str(i % 10), 0.6, 9.0)
    assert mon.alerts["confidence_drop"] and mon.alerts["rejection_rise"] and mon.alerts["latency_ratio"]
    assert mon.values["latency_ratio"] == pytest.approx(4.5)
    for i in range(100):
        mon.observe(str(i % 10), 0.95, None)  # cache hits: no latency, the old latencies age out with them
    assert not mon.alerts["confidence_drop"] and not mon.alerts["rejection_rise"]


def test_answer_cache_is_bounded_lru():
    from digitkit.serve.service import AnswerCache

    cache = AnswerCache(2)
    cache.put(("v", "a"), {"n": 1})
    cache.put(("v", "b"), {"n": 2})
    assert cache.get(("v", "a")) == {"n": 1}  # a is now the most recent
    cache.put(("v", "c"), {"n": 3})
    assert cache.get(("v", "b")) is None and len(cache) == 2
    off = AnswerCache(0)
    off.put(("v", "a"), {"n": 1})
    assert off.get(("v", "a")) is None


def test_settings_are_strict():
    from digitkit.errors import ConfigError
    from digitkit.serve import settings

    assert settings.from_dict({"limits": {"max_batch": 8}}).limits.max_batch == 8
    bad = [({"limts": {}}, "limts"), ({"drift": {"window": 10, "min_samples": 20}}, "min_samples"),
           ({"port": 70000}, "port"), ({"limits": {"request_timeout_s": 0}}, "request_timeout_s")]
    for raw, word in bad:
        with pytest.raises(ConfigError, match=word):
            settings.from_dict(raw)
    with pytest.raises(ConfigError, match="at least 8"):
        settings.from_dict({"api_key": "short"})


def test_server_with_a_postgresql_audit_log(mnist_small_run, tmp_path, postgres_url, digits):
    """`--audit-db postgresql://...`: answers, feedback and the admin export all go through PostgreSQL."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    from digitkit.serve.audit import AuditLog

    name = f"serve_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        with serve(mnist_small_run, tmp_path, "--audit-db", url, env={"DIGITKIT_ADMIN_TOKEN": ADMIN}) as srv, \
                srv.client() as c:  # fmt: skip
            ids = [c.post("/v1/predict", json={"pixels": image.tolist()}).json()["request_id"] for _, image in digits]
            assert c.post("/v1/feedback", json={"request_id": ids[7], "true_label": "7"}).json()["correct"]
            export = c.get("/v1/admin/audit/export", params={"format": "jsonl"}, headers=ADMIN_H).text.splitlines()
            assert {json.loads(line)["request_id"] for line in export} == set(ids)
        log = AuditLog(url)
        try:
            assert all(log.get(i) is not None for i in ids) and log.get(ids[7]).true_label == "7"
        finally:
            log.close()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
