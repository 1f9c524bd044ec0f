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
from typing import Any

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


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the `name` samples in Prometheus text whose labels include `labels` (e.g. route="/v1/predict")."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
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
        if len(os.sched_getaffinity(0)) >= 2:  # settings pin_cpu: each worker on a core of its own
            cores = [os.sched_getaffinity(int(pid)) for pid in by_worker]
            assert all(len(c) == 1 for c in cores) and len(set().union(*cores)) == 2, cores
        # Whichever worker answers the scrape reports the count of both (fresh connections: either worker).
        scraped = []
        for _ in range(6):
            text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            scraped.append(metric_total(text, "digitkit_requests_total", route="/v1/predict"))
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
        ("read pattern with a back-reference", "/v1/read", {"json": {"pixels": flat, "pattern": r"(\d)\1"}}),
        ("read pattern over 200 characters", "/v1/read", {"json": {"pixels": flat, "pattern": "1" * 201}}),
        ("read pattern expanding past the state cap", "/v1/read", {"json": {"pixels": flat,
                                                                          "pattern": "((1{100}){100})"}}),
        ("pixels of booleans", "/v1/predict", {"json": {"pixels": [[True, False], [False, True]]}}),
        ("bytes that are no image", "/v1/predict", {"content": b"\x00" * 64, "headers": raw}),
        ("feedback body of 1 MB", "/v1/feedback", {"content": b'{"request_id": "' + b"a" * 2**20 + b'"}',
                                                   "headers": as_json}),
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
            elif re.search(r"object at 0x|<[a-zA-Z_.]+ object", r.text):
                problems.append(f"{name} ({route}): a Python object repr in the answer: {r.text[:300]}")
    assert not problems, "\n".join(problems) + f"\n--- server log ---\n{server.log()[-3000:]}"
    assert "internal error" not in server.log()
    assert_serving(server, x)


# ------------------------------------------------------------------------------------------ attacks
# Each attack runs against a real server with small limits, bounded in count and time, while a prober measures
# /healthz from another address. The issue's aim is a /healthz p99 under 50 ms during each attack on 2 cores; the
# tests allow HEALTHZ_P99_MS (a shared, noisy CI machine) and fail far below what the defects caused (5.5 s for the
# pattern, time-outs for the flood, 938 ms p50 for the GIFs). benchmarks/serve_attacks.py gives the real figures.
HEALTHZ_P99_MS = 150.0
ATTACK_LIMITS = {"max_connections": 200, "max_connections_per_client": 50, "header_timeout_s": 1.5,
                 "body_timeout_s": 1.5, "max_inflight": 8, "max_inflight_per_client": 6}  # fmt: skip
ATTACKER = "127.0.0.2"
"""The attack's source address (all of 127.0.0.0/8 is this machine); the prober uses 127.0.0.1."""


@pytest.fixture(scope="module")
def guarded(mnist_small_run: Path, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("attacks")
    settings = tmp / "serve.yaml"
    settings.write_text(json.dumps({"limits": ATTACK_LIMITS}))
    with serve(mnist_small_run, tmp, "--settings", str(settings), "--audit-db", f"sqlite:///{tmp / 'audit.db'}") as s:
        yield s


class Prober:
    """/healthz over one keep-alive connection from 127.0.0.1, every 10 ms, in a thread, until stopped."""

    def __init__(self, server: Server) -> None:
        self.server, self.times_ms, self.failures = server, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get("/healthz")
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.times_ms.append((time.perf_counter() - t0) * 1000)
                self._stop.wait(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def p99(self) -> float:
        times = sorted(self.times_ms)
        return times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("inf")

    def check(self) -> None:
        assert len(self.times_ms) >= 20, f"only {len(self.times_ms)} health probes ran"
        assert not self.failures, f"/healthz failed during the attack: {self.failures[:5]}"
        assert self.p99() < HEALTHZ_P99_MS, (f"/healthz p99 {self.p99():.1f} ms during the attack (max "
                                             f"{max(self.times_ms):.1f} ms over {len(self.times_ms)} probes)")


def metric(server: Server, name: str, **labels: str) -> float:
    return metric_total(httpx.get(server.url + "/metrics", timeout=10).text, name, **labels)


def lag_over(server: Server, seconds: float) -> float:
    """Event-loop lag samples over `seconds` (from the digitkit_event_loop_lag_seconds histogram)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    count = bucket = 0.0
    for line in text.splitlines():
        if line.startswith("digitkit_event_loop_lag_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
        if line.startswith(f'digitkit_event_loop_lag_seconds_bucket{{le="{seconds}"}}'):
            bucket = float(line.rsplit(" ", 1)[1])
    return count - bucket


def attacker_socket(server: Server, address: str = ATTACKER) -> Any:
    import socket

    port = int(server.url.rsplit(":", 1)[1])
    s = socket.socket()
    s.bind((address, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def status_line(sock: Any) -> bytes:
    try:
        return sock.recv(4096).split(b"\r\n", 1)[0]
    except TimeoutError:
        return b"(no answer)"
    except OSError as e:
        return f"({e.__class__.__name__})".encode()


def test_a_catastrophic_pattern_is_matched_in_linear_time_and_the_loop_stays_free(guarded: Server,
                                                                                    mnist_train) -> None:  # fmt: skip
    from digitkit import synth

    # The pattern that froze the server: Python's re needs minutes on 20 digits; here it is one pass over them.
    ds = mnist_train
    row, labels, _ = synth.strip([ds.images[i, 0].numpy() for i in range(20)], [int(v) for v in ds.labels[:20]],
                                 seed=3, gap=(0.4, 0.6))  # fmt: skip
    body = {"image": base64.b64encode(png_bytes(row)).decode(), "pattern": r"((\d+)+)+x"}
    lag_before = lag_over(guarded, 0.05)
    with Prober(guarded) as prober, httpx.Client(base_url=guarded.url, timeout=30) as c:
        answers, slowest = [], 0.0
        while len(answers) < 5 or (len(answers) < 40 and len(prober.times_ms) < 50):  # about 1 s of attack
            t0 = time.perf_counter()
            answers.append(c.post("/v1/read", json=body))
            slowest = max(slowest, time.perf_counter() - t0)
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["pattern_ok"] is False and len(r.json()["text"]) >= 15, r.json()["text"]
    assert slowest < 2, f"a read with the pattern took {slowest:.1f} s"
    prober.check()
    assert lag_over(guarded, 0.05) - lag_before == 0, "the event loop was held over 50 ms during the reads"


def test_the_cli_read_pattern_has_the_same_engine(mnist_small_run: Path, mnist_train, tmp_path: Path) -> None:
    from digitkit import synth

    ds = mnist_train
    row, _, _ = synth.strip([ds.images[i, 0].numpy() for i in range(20)], [int(v) for v in ds.labels[:20]], seed=3,
                            gap=(0.4, 0.6))  # fmt: skip
    path = tmp_path / "row.png"
    path.write_bytes(png_bytes(row))
    cmd = [sys.executable, "-m", "digitkit", "read", "--model", str(mnist_small_run), str(path), "--pattern",
           r"((\d+)+)+x", "--json"]  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr  # read, and the text does not match
    assert json.loads(run.stdout)["pattern_ok"] is False
    assert time.perf_counter() - t0 < 30
    run = subprocess.run(cmd[:-3] + ["--pattern", r"(\d)\1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "back-references" in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_a_connection_flood_is_bounded_and_slow_headers_are_cut(guarded: Server) -> None:
    n = 300  # 50 held by the per-client limit, the rest refused at once
    refused_before = metric(guarded, "digitkit_connections_refused_total")
    fds_before = len(os.listdir(f"/proc/{guarded.process.pid}/fd"))
    with Prober(guarded) as prober:
        socks = []
        try:
            for _ in range(n):
                s = attacker_socket(guarded)
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")  # never finished
                socks.append(s)
            time.sleep(0.3)  # a burst is accepted before its refused connections are closed: count once it settled
            fds = len(os.listdir(f"/proc/{guarded.process.pid}/fd")) - fds_before
            t0 = time.perf_counter()
            lines = [status_line(s) for s in socks]
            waited = time.perf_counter() - t0
        finally:
            for s in socks:
                s.close()
    got = {line: lines.count(line) for line in set(lines)}
    assert got.get(b"HTTP/1.1 503 Service Unavailable", 0) == n - 50, got
    assert got.get(b"HTTP/1.1 408 Request Timeout", 0) == 50, got  # cut at header_timeout_s
    assert waited < ATTACK_LIMITS["header_timeout_s"] + 3, f"the slow headers were cut only after {waited:.1f} s"
    assert fds <= 50 + 5, f"the server held {fds} more file descriptors during the flood than before it"
    prober.check()
    assert metric(guarded, "digitkit_connections_refused_total") - refused_before == n
    log = guarded.log()
    assert "out of system resource" not in log and "Traceback" not in log, log[-3000:]


def test_a_slow_body_is_cut_and_answered_408(guarded: Server) -> None:
    before = metric(guarded, "digitkit_requests_total", route="/v1/predict", status="408")
    s = attacker_socket(guarded)
    try:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.perf_counter()
        line = b""
        s.settimeout(0.3)
        for _ in range(40):  # one byte every 0.3 s: 1,000 bytes would take 5 minutes
            try:
                s.sendall(b"x")
                line = s.recv(4096).split(b"\r\n", 1)[0]
                break
            except (TimeoutError, OSError):
                continue
        seconds = time.perf_counter() - t0
    finally:
        s.close()
    assert line == b"HTTP/1.1 408 Request Timeout", line
    assert seconds < ATTACK_LIMITS["body_timeout_s"] + 1.5, f"cut after {seconds:.1f} s"
    assert metric(guarded, "digitkit_requests_total", route="/v1/predict", status="408") == before + 1


def read_all(sock: Any, limit: int = 1 << 16) -> bytes:
    """What the server sends until it closes the connection (or 10 s pass)."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_an_oversized_header_is_refused_431_before_it_is_kept(guarded: Server, mnist_train) -> None:
    from digitkit.serve import protocol

    before = metric(guarded, "digitkit_connections_refused_total", reason="header_too_large")
    for head in (b"GET /healthz?" + b"a" * 20_000 + b" HTTP/1.1\r\n",  # a long URL, sent in pieces
                 b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"b" * 8_000 + b"\r\n" * 1
                 + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 100) for i in range(200))):  # many fields
        s = attacker_socket(guarded)
        try:
            for k in range(0, len(head), 4096):
                try:
                    s.sendall(head[k : k + 4096])
                except OSError:  # closed by the server mid-send: what it answered is still in the buffer
                    break
            answer = read_all(s)
        finally:
            s.close()
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"] == "request header too large" and "limits.max_header_bytes" in body["detail"], body
    assert metric(guarded, "digitkit_connections_refused_total", reason="header_too_large") == before + 2
    # A header under the limit is answered as before, and the server keeps serving.
    r = httpx.get(guarded.url + "/healthz", headers={"X-Pad": "d" * 8000}, timeout=10)
    assert r.status_code == 200, r.text
    assert protocol.protocol_path("auto").endswith("GuardedHttpToolsProtocol")  # httptools is a dependency
    assert "Traceback" not in guarded.log()


def test_the_h11_fallback_keeps_the_same_bounds(mnist_small_run: Path, tmp_path: Path) -> None:
    """settings `http: h11` (and a machine without httptools) serves through GuardedH11Protocol: a slow header is
    cut with 408, an oversized one is refused (by h11 itself: 400), and requests are answered."""
    settings = tmp_path / "serve.yaml"
    settings.write_text(json.dumps({"http": "h11", "limits": {"header_timeout_s": 1.0, "max_header_bytes": 4096}}))
    with serve(mnist_small_run, tmp_path, "--settings", str(settings), "--audit-db",
               f"sqlite:///{tmp_path / 'audit.db'}") as server:  # fmt: skip
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        slow = attacker_socket(server)
        big = attacker_socket(server)
        try:
            slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # never finished
            big.sendall(b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"e" * 6000 + b"\r\n\r\n")
            t0 = time.perf_counter()
            slow_answer = read_all(slow)
            waited = time.perf_counter() - t0
            big_answer = read_all(big)
        finally:
            slow.close()
            big.close()
        assert slow_answer.startswith(b"HTTP/1.1 408 Request Timeout"), slow_answer[:200]
        assert waited < 1.0 + 3, f"the slow header was cut only after {waited:.1f} s"
        # h11 refuses it itself (uvicorn answers its parse errors 400; the httptools protocol says 431).
        assert big_answer.startswith(b"HTTP/1.1 400 Bad Request"), big_answer[:200]
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_the_http_setting_is_checked() -> None:
    from digitkit.errors import ConfigError
    from digitkit.serve import protocol
    from digitkit.serve.settings import from_dict

    with pytest.raises(ConfigError, match="expected auto, httptools or h11"):
        from_dict({"http": "http2"})
    with pytest.raises(ConfigError, match="max_header_bytes"):
        from_dict({"limits": {"max_header_bytes": 0}})
    assert protocol.protocol_path("h11").endswith(":GuardedH11Protocol")
    saved = protocol.HttpToolsProtocol
    try:
        protocol.HttpToolsProtocol = None  # as on a machine without httptools
        assert protocol.protocol_path("auto").endswith(":GuardedH11Protocol")
        with pytest.raises(ConfigError, match="pip install httptools"):
            protocol.protocol_path("httptools")
    finally:
        protocol.HttpToolsProtocol = saved


def gif_of_frames(frames: int) -> bytes:
    """A valid GIF of `frames` 1x1 frames (22 bytes each), built without PIL: 360,000 frames are 7.9 MB."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control: no delay
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor
             + b"\x02\x02\x44\x01\x00")  # LZW: min code size 2, one sub-block (clear, 0, end), terminator
    return header + loop + frame * frames + b"\x3b"


def test_a_gif_of_360000_frames_costs_one_frame(guarded: Server, mnist_train) -> None:
    from digitkit.preprocess import load_image

    bomb = gif_of_frames(360_000)
    assert len(bomb) < 8 * 2**20
    t0 = time.perf_counter()
    assert load_image(bomb).shape == (1, 1)
    assert time.perf_counter() - t0 < 0.1  # was 0.75 s: every frame was walked to count them
    normal = png_bytes(digits(mnist_train, 1)[0])
    stop = threading.Event()
    bomb_times: list[float] = []

    def attack() -> None:
        with httpx.Client(base_url=guarded.url, timeout=30) as c:
            for _ in range(6):
                if stop.is_set():
                    return
                t = time.perf_counter()
                r = c.post("/v1/predict", content=bomb, headers={"Content-Type": "image/gif"})
                bomb_times.append(time.perf_counter() - t)
                assert r.status_code in (200, 422), r.text

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    user_ms = []
    with Prober(guarded) as prober, httpx.Client(base_url=guarded.url, timeout=30) as c:
        for t in attackers:
            t.start()
        while any(t.is_alive() for t in attackers) and len(user_ms) < 400:
            t0 = time.perf_counter()
            assert c.post("/v1/predict", content=normal, headers={"Content-Type": "image/png"}).status_code == 200
            user_ms.append((time.perf_counter() - t0) * 1000)
        stop.set()
        for t in attackers:
            t.join(timeout=60)
    prober.check()
    user_ms.sort()
    assert len(bomb_times) >= 6 and max(bomb_times) < 2.0, bomb_times
    assert user_ms[len(user_ms) // 2] < 100, f"a normal user's p50 was {user_ms[len(user_ms) // 2]:.1f} ms"


def test_every_error_is_counted_once_with_its_real_status(guarded: Server, mnist_train) -> None:
    route = "/v1/predict"
    png = png_bytes(digits(mnist_train, 1)[0])

    def count(status: str) -> float:
        return metric(guarded, "digitkit_requests_total", route=route, status=status)

    before = {k: count(k) for k in ("413", "500", "503")}
    gone_before = metric(guarded, "digitkit_client_disconnects_total", route=route)
    limit = 8 * 2**20
    # 413 decided from Content-Length, before any body is read
    s = attacker_socket(guarded)
    s.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {limit + 1}\r\n\r\n"
              .encode())  # fmt: skip
    assert status_line(s) == b"HTTP/1.1 413 Request Entity Too Large"
    s.close()
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        # 413 on a chunked body, while it streams in
        r = c.post(route, content=iter([b"x" * 2**20] * 9), headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "request too large", r.text
    # A client that leaves in the middle of its body
    s = attacker_socket(guarded)
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
              + png[:100])  # fmt: skip
    time.sleep(0.2)
    s.close()
    # In-flight limits: slow bodies from one address take its 6 slots (the 7th is refused), others still get in;
    # a second address takes the last 2 of the worker's 8, and then everyone gets 503 with Retry-After.
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 99\r\n\r\n"
    held = []
    try:
        for address, n in ((ATTACKER, ATTACK_LIMITS["max_inflight_per_client"]), ("127.0.0.3", 0)):
            for _ in range(n):
                held.append(attacker_socket(guarded, address))
                held[-1].sendall(head)
        time.sleep(0.3)
        extra = attacker_socket(guarded)
        extra.sendall(head)
        assert status_line(extra) == b"HTTP/1.1 503 Service Unavailable"
        extra.close()
        assert httpx.post(guarded.url + route, content=png, headers={"Content-Type": "image/png"}).status_code == 200
        for _ in range(2):
            held.append(attacker_socket(guarded, "127.0.0.3"))
            held[-1].sendall(head)
        time.sleep(0.3)
        r = httpx.post(guarded.url + route, content=png, headers={"Content-Type": "image/png"}, timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
        assert httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200  # never refused by this limit
    finally:
        for h in held:
            h.close()
    time.sleep(0.3)
    assert count("413") == before["413"] + 2
    assert count("503") == before["503"] + 2
    assert count("500") == before["500"] == 0
    assert metric(guarded, "digitkit_client_disconnects_total", route=route) >= gone_before + 1
    log = guarded.log()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def test_a_low_descriptor_limit_lowers_the_connection_limit_and_the_server_keeps_serving(mnist_small_run: Path,
                                                                                           tmp_path: Path) -> None:
    # ulimit -n 400: 64 kept for files and the database, 256 for the accept backlog, so 80 connections at most
    settings = tmp_path / "serve.yaml"
    settings.write_text(json.dumps({"limits": {"max_connections_per_client": 1000, "header_timeout_s": 2}}))
    with serve(mnist_small_run, tmp_path, "--settings", str(settings), max_fds=400) as server:
        assert "limits.max_connections lowered from 1000 to 80" in server.log()
        socks = []
        try:
            for _ in range(150):
                socks.append(attacker_socket(server))
                socks[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            time.sleep(0.5)
            assert len(os.listdir(f"/proc/{server.process.pid}/fd")) < 400 - 100
            lines = [status_line(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert lines.count(b"HTTP/1.1 503 Service Unavailable") == 70, {x: lines.count(x) for x in set(lines)}
        assert lines.count(b"HTTP/1.1 408 Request Timeout") == 80
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        log = server.log()
        assert "out of system resource" not in log and "Traceback" not in log, log[-2000:]


def test_repeated_accept_errors_are_logged_once_per_period() -> None:
    import logging

    from digitkit.serve.protocol import RateLimitedLog

    logger = logging.getLogger("digitkit-test-accept")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    logger.addFilter(RateLimitedLog(("socket.accept() out of system resource",), every_s=60))
    logger.propagate = False
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        for _ in range(10_000):
            logger.error("socket.accept() out of system resource\nsocket: <socket>", exc_info=True)
    logger.error("something else")
    assert len(records) == 2 and records[0].exc_info is None and "logged at most once per 60 s" in records[0].msg
    assert records[1].getMessage() == "something else"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores: a one-core machine is left as it is")
def test_the_server_process_is_pinned_to_one_core(guarded: Server) -> None:
    """settings pin_cpu (default true): `digitkit serve` runs on one core (digitkit.serve.cpu)."""
    assert len(os.sched_getaffinity(guarded.process.pid)) == 1
