"""The real server under abuse: a schema-based fuzz run, SIGKILL under load, several workers, malformed input.

Every test talks HTTP to a `digitkit serve` subprocess (tests/serving.py). The fuzz run is schemathesis's CLI
(`st run`, its stable interface in 4.x) over every operation of /openapi.json, with a fixed number of examples
per operation, deterministic generation and a hard time limit (a subprocess timeout: st's --max-time would
instead keep fuzzing until the budget is spent).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving import Server, serve

API_KEY = "robustness-api-key"
ADMIN_TOKEN = "robustness-admin-token"
SECRETS = {"DIGITKIT_API_KEY": API_KEY, "DIGITKIT_ADMIN_TOKEN": ADMIN_TOKEN}
AUTH = {"X-API-Key": API_KEY}
FUZZ_EXAMPLES = 15
"""Examples per operation and phase: about 400 requests, 15-25 s on 2 cores."""
FUZZ_TIMEOUT_S = 75
LOAD_S = 1.5
"""Seconds of load before the SIGKILL."""


# ------------------------------------------------------------------------------------------ helpers
def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def bomb_png(side: int = 20_000) -> bytes:
    """A valid side x side 8-bit gray PNG of zeros (400 MB decoded for 20000), compressed row by row: about
    400 kB, built without ever holding the image in memory."""
    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_header(side, side) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def digits(mnist_train, n: int) -> list[np.ndarray]:
    return [mnist_train.images[i, 0].numpy() for i in range(n)]


def metric_total(text: str, name: str, route: str) -> float:
    """Sum of `name` samples with route=`route` (all status codes) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def open_audit(url: str):
    from digitkit.serve.audit import AuditLog

    return AuditLog(url)


@pytest.fixture(scope="module")
def server(mnist_small_run: Path, tmp_path_factory) -> Server:
    """One server for the fuzz run and the malformed inputs, with an API key and an admin token."""
    tmp = tmp_path_factory.mktemp("robust")
    with serve(mnist_small_run, tmp, "--audit-db", f"sqlite:///{tmp / 'audit.db'}", env=SECRETS) as s:
        yield s


def assert_serving(server: Server, image: np.ndarray) -> None:
    assert server.process.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    with server.client(headers=AUTH) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/predict", content=png_bytes(image), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["digit"] is not None


# ------------------------------------------------------------------------------------------ fuzz
def dangling_refs(spec: dict) -> set[str]:
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
    return refs - set(spec.get("components", {}).get("schemas", {}))


def fuzz_spec(spec: dict, samples: list[bytes]) -> dict:
    """The published spec with the image fields of the request bodies narrowed so the fuzz reaches the model and
    not only the validation: `pixels` to small rectangles of 0-255, `image` to valid base64 (of random bytes, or
    of a real PNG/JPEG digit) and a batch to 1-4 images. Random strings, ragged lists and empty batches are
    almost never valid, so otherwise nearly every positive case dies as a 422 before any image work; negative
    generation still sends what violates the narrowed schema."""
    spec = copy.deepcopy(spec)
    components = spec["components"]["schemas"]
    pixels = {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "array", "minItems": 3, "maxItems": 3,
              "items": {"type": "number", "minimum": 0, "maximum": 255}}}  # fmt: skip
    image = {"anyOf": [{"type": "string", "pattern": "^(?:[A-Za-z0-9+/]{4}){0,6}$"},
                       {"enum": [base64.b64encode(raw).decode() for raw in samples]}]}  # fmt: skip
    for schema in components.values():
        props = schema.get("properties", {})
        if {"image", "pixels"} <= props.keys():
            props["image"], props["pixels"] = image, pixels
            schema["oneOf"] = [{"required": ["image"]}, {"required": ["pixels"]}]
    components["BatchIn"]["properties"]["images"].update(minItems=1, maxItems=4)
    return spec


def test_schema_fuzz_finds_no_server_error(server: Server, tmp_path: Path, mnist_train) -> None:
    x = digits(mnist_train, 1)[0]
    spec_path = tmp_path / "openapi.json"
    published = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert not dangling_refs(published), f"/openapi.json refers to undefined schemas {dangling_refs(published)}"
    spec = fuzz_spec(published, [png_bytes(255 - x), jpeg_bytes(x)])
    spec_path.write_text(json.dumps(spec))
    operations = sum(len(methods) for methods in spec["paths"].values())
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", str(spec_path), "--url", server.url, "--checks", "not_a_server_error",
           "--max-examples", str(FUZZ_EXAMPLES), "--generation-deterministic", "--continue-on-failure",
           "--workers", "1", "--request-timeout", "30", "--no-color", "--output-truncate", "false",
           "--phases", "examples,coverage,fuzzing",
           "-H", f"X-API-Key: {API_KEY}", "-H", f"X-Admin-Token: {ADMIN_TOKEN}"]  # fmt: skip
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzz run took over {FUZZ_TIMEOUT_S} s:\n{e.stdout}")
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found server errors (or failed):\n{report}\n--- server log ---\n" \
                                f"{server.log()[-5000:]}"  # fmt: skip
    assert f"{operations} selected / {operations} total" in report and f"Tested: {operations}" in report, report
    assert "unresolvable reference" not in report, report
    # The secrets got the fuzz past auth: predictions and admin routes answered 200 at least once.
    with server.client() as c:
        text = c.get("/metrics").text
    for route in ("/v1/predict", "/v1/predict/batch", "/v1/admin/audit/stats", "/v1/admin/audit/export"):
        ok = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("digitkit_requests_total{") and f'route="{route}"' in line
                 and 'status="200"' in line)  # fmt: skip
        assert ok > 0, f"no 200 from {route} during the fuzz run: auth was never passed?\n{report}"
    assert "internal error" not in server.log()
    assert_serving(server, x)


# ------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_under_load_loses_no_acknowledged_prediction(mnist_small_run: Path, tmp_path: Path,
                                                              mnist_train) -> None:  # fmt: skip
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    images = [png_bytes(x) for x in digits(mnist_train, 300)]
    acked: dict[str, str | None] = {}  # request_id -> digit, for every 200
    counts = {"single": 0, "batch": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int, batch: bool) -> None:
        i = worker
        with httpx.Client(timeout=10, headers=AUTH) as c:
            while not stop.is_set():
                try:
                    if batch:
                        items = [{"image": base64.b64encode(images[(i + k) % len(images)]).decode()} for k in range(8)]
                        r = c.post(server.url + "/v1/predict/batch", json={"images": items})
                        results = r.json()["results"] if r.status_code == 200 else []
                    else:
                        r = c.post(server.url + "/v1/predict", content=images[i % len(images)],
                                   headers={"Content-Type": "image/png"})  # fmt: skip
                        results = [r.json()] if r.status_code == 200 else []
                except (httpx.HTTPError, ValueError):
                    return  # the server is gone: whatever was in flight was never acknowledged
                with lock:
                    for res in results:
                        acked[res["request_id"]] = res["digit"]
                    counts["batch" if batch else "single"] += len(results)
                i += 4

    with serve(mnist_small_run, tmp_path, "--audit-db", url, env=SECRETS) as server:
        threads = [threading.Thread(target=load, args=(w, w % 2 == 1)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert server.process.returncode == -signal.SIGKILL
    assert counts["single"] >= 10 and counts["batch"] >= 40, f"too little load before the kill: {counts}"

    audit = open_audit(url)
    try:
        missing = [rid for rid in acked if audit.get(rid) is None]
        wrong = [rid for rid, digit in acked.items() if rid not in missing and audit.get(rid).digit != digit]
    finally:
        audit.close()
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged predictions are not in the audit log"
    assert not wrong, f"{len(wrong)} audit records disagree with the answer sent"


# ------------------------------------------------------------------------------------------ workers
def per_worker_requests(tmp_root: Path, route: str) -> dict[str, float]:
    """digitkit_requests_total for `route` by worker pid, read from the prometheus multiprocess files."""
    from prometheus_client.mmap_dict import MmapedDict

    out: dict[str, float] = {}
    for f in tmp_root.glob("digitkit-metrics-*/counter_*.db"):
        pid = f.stem.split("_", 1)[1]
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(f)):
            _, name, labels, _ = json.loads(key)
            if name == "digitkit_requests_total" and labels.get("route") == route:
                out[pid] = out.get(pid, 0.0) + value
    return out


def test_two_workers_share_one_audit_log_and_one_metrics_view(mnist_small_run: Path, tmp_path: Path,
                                                               mnist_train) -> None:  # fmt: skip
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    tmp_root = tmp_path / "tmp"  # cmd_serve's prometheus directory goes here (tempfile honours TMPDIR)
    tmp_root.mkdir()
    images = [png_bytes(x) for x in digits(mnist_train, 64)]
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def send(start: int, n: int) -> None:
        for k in range(start, start + n):
            # A fresh connection per request, so the kernel hands them to either worker.
            r = httpx.post(server.url + "/v1/predict", content=images[k % len(images)],
                           headers={**AUTH, "Content-Type": "image/png", "Connection": "close"}, timeout=30)
            with lock:
                if r.status_code == 200:
                    ids.append(r.json()["request_id"])
                else:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    with serve(mnist_small_run, tmp_path, "--workers", "2", "--audit-db", url,
               env={**SECRETS, "TMPDIR": str(tmp_root)}) as server:  # fmt: skip
        # Send in rounds until both workers have answered (almost always the first round).
        for round_ in range(8):
            threads = [threading.Thread(target=send, args=(round_ * 40 + 10 * t, 10)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            by_worker = per_worker_requests(tmp_root, "/v1/predict")
            if len([v for v in by_worker.values() if v > 0]) >= 2:
                break
        sent = len(ids)
        assert not errors, errors
        assert len([v for v in by_worker.values() if v > 0]) == 2, f"one worker answered everything: {by_worker}"
        assert sum(by_worker.values()) == sent
        # Whichever worker answers the scrape reports the count of both (fresh connections: either worker).
        scraped = []
        for _ in range(6):
            text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            scraped.append(metric_total(text, "digitkit_requests_total", "/v1/predict"))
        assert scraped == [sent] * len(scraped), f"sent {sent}, /metrics said {scraped}; per worker {by_worker}"
        with httpx.Client(base_url=server.url, headers={"X-Admin-Token": ADMIN_TOKEN}) as c:
            stats = c.get("/v1/admin/audit/stats")
            assert stats.status_code == 200, stats.text
    audit = open_audit(url)
    try:
        missing = [rid for rid in ids if audit.get(rid) is None]
    finally:
        audit.close()
    assert len(set(ids)) == sent and not missing, f"{len(missing)} of {sent} predictions missing from the audit log"


# ------------------------------------------------------------------------------------------ malformed input
# tests/test_serve.py covers /v1/predict with bad bytes, header-only and real bombs, NaN, ragged and out-of-range
# pixels, bad JSON and base64. These are the forms and routes it does not reach.
def _bodies(x: np.ndarray) -> list[tuple[str, str, dict]]:
    png, jpeg = png_bytes(x), jpeg_bytes(x)
    zero = png_header(0, 0) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    bomb = bomb_png()
    nan_row = "[" + ",".join(["NaN"] * 28) + "]"
    raw, as_json = {"Content-Type": "image/png"}, {"Content-Type": "application/json"}
    flat = [[0] * 28] * 28
    return [
        ("PNG cut in its pixel data", "/v1/predict", {"content": png[: len(png) - 40], "headers": raw}),
        ("JPEG cut after a third", "/v1/predict",
         {"content": jpeg[: len(jpeg) // 3], "headers": {"Content-Type": "image/jpeg"}}),
        ("JPEG header only", "/v1/predict", {"content": jpeg[:200], "headers": {"Content-Type": "image/jpeg"}}),
        ("0x0 PNG with data", "/v1/predict", {"content": zero, "headers": raw}),
        ("bomb PNG as raw body", "/v1/predict", {"content": bomb, "headers": raw}),
        ("bomb PNG to /v1/read", "/v1/read", {"content": bomb, "headers": raw}),
        ("bomb PNG to /v1/explain", "/v1/explain", {"json": {"image": base64.b64encode(bomb).decode()}}),
        ("truncated PNG to /v1/read", "/v1/read", {"content": png[: len(png) // 2], "headers": raw}),
        ("0x0 PNG to /v1/read", "/v1/read", {"content": zero, "headers": raw}),
        ("base64 of a PDF", "/v1/predict", {"json": {"image": base64.b64encode(b"%PDF-1.4 nope").decode()}}),
        ("JSON string", "/v1/predict", {"json": "7"}),
        ("JSON null", "/v1/predict", {"json": None}),
        ("pixels flat list", "/v1/predict", {"json": {"pixels": [0, 1, 2]}}),
        ("pixels empty row", "/v1/predict", {"json": {"pixels": [[]]}}),
        ("pixels 3-D", "/v1/predict", {"json": {"pixels": [[[0, 1]], [[2, 3]]]}}),
        ("pixels of strings", "/v1/predict", {"json": {"pixels": [["a", "b"], ["c", "d"]]}}),
        ("pixels negative", "/v1/predict", {"json": {"pixels": [[-5.0] * 28] * 28}}),
        ("pixels 1e400 (inf)", "/v1/predict", {"content": '{"pixels": [[1e400, 0], [0, 0]]}', "headers": as_json}),
        ("pixels wider than max side", "/v1/predict", {"json": {"pixels": [[0] * 2000]}}),
        ("NaN pixels to /v1/read", "/v1/read", {"content": '{"pixels": [' + ",".join([nan_row] * 28) + "]}",
                                                "headers": as_json}),
        ("inf pixels to /v1/explain", "/v1/explain", {"content": '{"pixels": [[1e999]]}', "headers": as_json}),
        ("NaN pixels in a batch", "/v1/predict/batch",
         {"content": '{"images": [{"pixels": [' + ",".join([nan_row] * 28) + "]}]}", "headers": as_json}),
        ("top_k 0", "/v1/predict", {"json": {"pixels": flat, "top_k": 0}}),
        ("top_k a string", "/v1/predict", {"json": {"pixels": flat, "top_k": "three"}}),
        ("batch images an object", "/v1/predict/batch", {"json": {"images": {"image": "AAAA"}}}),
        ("batch of strings", "/v1/predict/batch", {"json": {"images": ["AAAA"]}}),
        ("batch item with both fields", "/v1/predict/batch", {"json": {"images": [{"image": "AAAA", "pixels": flat}]}}),
        ("batch bad base64 item", "/v1/predict/batch", {"json": {"images": [{"image": "%%%"}]}}),
        ("read pattern not a string", "/v1/read", {"json": {"pixels": flat, "pattern": 5}}),
        ("explain methods empty", "/v1/explain", {"json": {"pixels": flat, "methods": []}}),
        ("feedback wrong types", "/v1/feedback", {"json": {"request_id": 5, "true_label": ["7"]}}),
        ("feedback as PNG", "/v1/feedback", {"content": png, "headers": raw}),
        ("deeply nested JSON", "/v1/predict", {"content": "[" * 100_000 + "]" * 100_000, "headers": as_json}),
        ("JSON with a lone surrogate", "/v1/predict", {"content": '{"image": "\\ud800"}', "headers": as_json}),
        ("body not UTF-8", "/v1/predict", {"content": b'{"image": "\xff\xfe"}', "headers": as_json}),
        ("multipart with a broken boundary", "/v1/predict",
         {"content": b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n" + png[:30],
          "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}),
        ("multipart file of type text/plain", "/v1/predict", {"files": {"file": ("a.txt", b"7", "text/plain")}}),
        ("batch multipart of 257 files", "/v1/predict/batch",
         {"files": [("files", (f"{i}.png", png, "image/png")) for i in range(257)]}),
    ]  # fmt: skip


def test_malformed_inputs_get_4xx_json_and_the_server_keeps_serving(server: Server, mnist_train) -> None:
    x = digits(mnist_train, 1)[0]
    problems = []
    with server.client(headers=AUTH) as c:
        for name, route, kwargs in _bodies(x):
            r = c.post(route, **kwargs)
            try:
                body = r.json()
            except ValueError:
                body = None
            if not (400 <= r.status_code < 500 and isinstance(body, dict) and set(body) == {"error", "detail"}):
                problems.append(f"{name} ({route}): {r.status_code} {r.text[:300]}")
    assert not problems, "\n".join(problems) + f"\n--- server log ---\n{server.log()[-3000:]}"
    assert "internal error" not in server.log()
    assert_serving(server, x)
