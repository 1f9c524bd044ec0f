"""REST serving under a bounded load: latency and throughput in-process and over HTTP on 127.0.0.1.

Aims (issue 27, on 2 cores, zero errors): a 28x28 PNG answered in p50 <= 1.5 ms in-process and <= 2.5 ms over HTTP
with one client, >= 1,000 PNG requests/s over HTTP with 8 clients, and a batch of 256 PNGs at >= 3,000 images/s.

In-process: requests go through the
whole ASGI app (routing, body parsing, auth, the service, the audit-log commit, metrics), called directly as an ASGI
application with request bodies encoded beforehand, one at a time, no network: the latency is the server's own, not
a client library's (httpx.ASGITransport adds about 0.8 ms per call; `asgi+httpx/*` rows show it); and straight to
`Service.predict` (no HTTP at all), and each stage of a PNG answer on its own (`stages`: decode, preprocess, model,
rules, audit commit, JSON render; the ASGI and HTTP overheads as differences of the end-to-end medians). Over HTTP:
`digitkit serve` in a subprocess on a free port, driven by 1, 4 and 8 concurrent clients sending a fixed number of
requests each scenario, stopped early at --time-limit seconds. Each client is a separate process writing requests
encoded beforehand to one raw keep-alive socket and reading the answers (status line, Content-Length, body): a
client costs a few microseconds of CPU per request, so on 2 cores it is the server that is measured, not the
client library (httpx costs about 0.3 ms a request, which 8 client threads in one process would spend on the GIL).

Forms: a 28x28 PNG digit from the MNIST test set as the raw body, the same digit as JSON `pixels` (preprocessed like
any image) and as JSON `pixels` with `model_input: true` (already the model's input: preprocessing skipped), and JSON
batches of 32 and 256 base64 PNGs. Every request is a different test image and the answer cache is off
(cache_size 0), so each figure is of computed answers; the audit log is a fresh SQLite file. Latency figures are
the median over --repeats repeats of each repeat's percentile; the machine is shared, so compare within one run.

    python benchmarks/serve_load.py [--model runs/latest] [--requests 400] [--repeats 3] [--time-limit 20]
        [--clients 1 4 8] [--workers 1] [--batch-wait-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from digitkit import data

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "serve-load-benchmark-key"
FORMS = {"png": 1, "pixels": 1, "model_input": 1, "batch32": 32, "batch256": 256}
"""Request form -> images per request."""


# ------------------------------------------------------------------------------------------ requests
def test_digits(n: int) -> list[np.ndarray]:
    ds = data.load_split(ROOT / "data" / "mnist", "test")
    return [ds.images[i, 0].numpy() for i in range(min(n, len(ds)))]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Requests:
    """The i-th request of each form, as httpx keyword arguments (every request a different test image)."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.pngs = [png_bytes(x) for x in images]
        self.b64 = [base64.b64encode(p).decode() for p in self.pngs]

    def kwargs(self, form: str, i: int) -> tuple[str, dict[str, Any]]:
        n = len(self.images)
        if form == "png":
            return "/v1/predict", {"content": self.pngs[i % n], "headers": {"Content-Type": "image/png"}}
        if form == "pixels":
            return "/v1/predict", {"json": {"pixels": self.images[i % n].tolist()}}
        if form == "model_input":  # the digit is already MNIST-format: preprocessing skipped
            return "/v1/predict", {"json": {"pixels": self.images[i % n].tolist(), "model_input": True}}
        size = FORMS[form]
        return "/v1/predict/batch", {"json": {"images": [{"image": self.b64[(i * size + k) % n]}
                                                         for k in range(size)]}}  # fmt: skip


class Prepared:
    """One request as the ASGI app receives it: method, path, headers and body, encoded once before timing."""

    def __init__(self, route: str, kwargs: dict[str, Any]) -> None:
        kwargs = {**kwargs, "headers": {"X-API-Key": API_KEY, **kwargs.get("headers", {})}}
        request = httpx.Request("POST", f"http://bench{route}", **kwargs)
        self.path = route
        self.body = request.read()
        self.headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]


async def asgi_call(app: Any, req: Prepared) -> tuple[int, bytes]:
    """Call the ASGI app as a server would, in-process: one http scope, the body in one message; returns (status,
    body). A receive() after the body waits for the response to finish, then reports the client gone."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": req.path, "raw_path": req.path.encode(), "query_string": b"", "root_path": "",
             "headers": req.headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    pending = [{"type": "http.request", "body": req.body, "more_body": False}]
    done = asyncio.Event()
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(chunks)


def summary(latencies_s: list[float], wall_s: float, images_per_request: int, errors: int) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1000
    done = len(latencies_s)
    return {"requests": done + errors, "ok": done, "errors": errors, "wall_s": round(wall_s, 3),
            "requests_per_s": round(done / wall_s, 1) if wall_s else None,
            "images_per_s": round(done * images_per_request / wall_s, 1) if wall_s else None,
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if done else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 3) if done else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if done else None}  # fmt: skip


def median_of(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeats; counts are summed."""
    out: dict[str, Any] = {"repeats": len(repeats)}
    for key in repeats[0]:
        values = [r[key] for r in repeats if r[key] is not None]
        if key in ("requests", "ok", "errors"):
            out[key] = sum(values)
        else:
            out[key] = round(statistics.median(values), 3) if values else None
    return out


def count_for(form: str, requests: int) -> int:
    """Requests per repeat: --requests single images, and about as many images in batches (at least 4)."""
    return max(4, requests // FORMS[form]) if FORMS[form] > 1 else requests


# ------------------------------------------------------------------------------------------ in-process
def in_process(model: str, reqs: Requests, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from digitkit.serve.app import create_app
    from digitkit.serve.service import Input
    from digitkit.serve.settings import from_dict

    settings = from_dict({"model": model, "cache_size": 0, "audit_db": f"sqlite:///{tmp / 'inproc.db'}",
                          "api_key": API_KEY, "log_level": "warning", "engine": args.engine,
                          "batching": {"wait_ms": args.batch_wait_ms}})  # fmt: skip
    app = create_app(settings)
    results: dict[str, Any] = {}

    async def run() -> None:
        async with app.router.lifespan_context(app):
            for form in FORMS:
                n = count_for(form, args.requests)
                for i in range(min(20, n)):  # warm-up: first calls pay for lazy imports and allocations
                    await asgi_call(app, Prepared(*reqs.kwargs(form, 10_000 + i)))
                repeats = []
                for rep in range(args.repeats):
                    prepared = [Prepared(*reqs.kwargs(form, rep * n + i)) for i in range(n)]
                    lat, errors, t_start = [], 0, time.perf_counter()
                    for req in prepared:
                        t0 = time.perf_counter()
                        status, _ = await asgi_call(app, req)
                        if status == 200:
                            lat.append(time.perf_counter() - t0)
                        else:
                            errors += 1
                        if time.perf_counter() - t_start > args.time_limit:
                            break
                    repeats.append(summary(lat, time.perf_counter() - t_start, FORMS[form], errors))
                results[f"asgi/{form}"] = median_of(repeats)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                         headers={"X-API-Key": API_KEY}) as client:  # fmt: skip
                # The same app through httpx's in-process transport, for comparison with the direct calls.
                for form in ("png", "model_input"):
                    repeats = []
                    for rep in range(args.repeats):
                        lat, errors, t_start = [], 0, time.perf_counter()
                        for i in range(args.requests):
                            route, kw = reqs.kwargs(form, rep * args.requests + i)
                            t0 = time.perf_counter()
                            r = await client.post(route, **kw)
                            if r.status_code == 200:
                                lat.append(time.perf_counter() - t0)
                            else:
                                errors += 1
                            if time.perf_counter() - t_start > args.time_limit:
                                break
                        repeats.append(summary(lat, time.perf_counter() - t_start, 1, errors))
                    results[f"asgi+httpx/{form}"] = median_of(repeats)
                # The floor of that path: httpx client + ASGI app + middleware on a route that does nothing.
                repeats = []
                for _ in range(args.repeats):
                    lat, t_start = [], time.perf_counter()
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        await client.get("/healthz")
                        lat.append(time.perf_counter() - t0)
                    repeats.append(summary(lat, time.perf_counter() - t_start, 0, 0))
                results["asgi+httpx/healthz"] = median_of(repeats)
            # The service alone: preprocess, model, rejection rules, audit commit; no HTTP.
            svc = app.state.service
            repeats = []
            for rep in range(args.repeats):
                lat, t_start = [], time.perf_counter()
                for i in range(args.requests):
                    item = Input(reqs.pngs[(rep * args.requests + i) % len(reqs.pngs)], "png")
                    t0 = time.perf_counter()
                    svc.predict([item], "predict", "bench", strict=True)
                    lat.append(time.perf_counter() - t0)
                    if time.perf_counter() - t_start > args.time_limit:
                        break
                repeats.append(summary(lat, time.perf_counter() - t_start, 1, 0))
            results["service/png"] = median_of(repeats)
            results["stages_p50_ms"] = stages(svc, reqs, args.requests)

    asyncio.run(run())
    return results


def stages(svc: Any, reqs: Requests, n: int) -> dict[str, float]:
    """Median milliseconds of each stage of one PNG answer, each called on its own: decode (PNG bytes -> gray),
    preprocess (the decoded image -> the model's input: the fast path for these MNIST digits; `preprocess_full` is
    the full real-world path on the same images, for comparison), model (the forward pass of one image), rules (the
    rejection rules and the answer's fields), audit commit (one row, one transaction) and JSON render (the answer
    dict -> the response body)."""
    from fastapi.responses import JSONResponse

    from digitkit.preprocess import _load, _preprocess_decoded, fast_path, mnist_format
    from digitkit.serve.audit import AuditRecord
    from digitkit.serve.service import Input

    rec = svc.loaded.recognizer
    cfg = rec.preprocess_cfg
    pngs = reqs.pngs[:n]
    decoded = [_load(p, cfg.max_side) for p in pngs]
    found = [(mnist_format(g, cfg), g, info) for g, info in decoded]
    pres = [fast_path(f, [info], cfg)[0] if f.ok[0] else _preprocess_decoded(g, info, cfg) for f, g, info in found]
    xs = [p.tensor[None] for p in pres]
    probs = [rec.probs(x) for x in xs]
    answer = svc.predict([Input(pngs[0], "png")], "bench", "bench", strict=True)[0]

    def timed(fn: Any, items: list[Any]) -> float:
        times = []
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 3)

    def fast(item: tuple[np.ndarray, dict[str, Any]]) -> None:
        found = mnist_format(item[0], cfg)
        if found.ok[0]:
            fast_path(found, [item[1]], cfg)
        else:
            _preprocess_decoded(item[0], item[1], cfg)

    image = bytes(784)
    return {
        "decode": timed(lambda p: _load(p, cfg.max_side), pngs),
        "preprocess": timed(fast, decoded),
        "preprocess_full": timed(lambda d: _preprocess_decoded(d[0], d[1], cfg), decoded[: max(n // 4, 1)]),
        "model": timed(rec.probs, xs),
        "rules": timed(lambda k: rec._decide_batch(probs[k], xs[k], [pres[k].record], len(rec.classes)),
                       list(range(len(xs)))),
        "audit_commit": timed(lambda i: svc.audit.record([AuditRecord(
            request_id=f"stage-{time.time_ns()}-{i}", time=time.time(), route="bench", input_sha256="0" * 64,
            model_version="bench", digit="0", confidence=1.0, rejected=None, latency_ms=0.0, client="bench",
            image=image)]), list(range(n))),
        "json_render": timed(lambda _: JSONResponse(answer), list(range(n))),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ over HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    settings = tmp / f"serve-{port}.yaml"
    settings.write_text(json.dumps({"batching": {"wait_ms": args.batch_wait_ms}, "http": args.http,
                                    "pin_cpu": args.pin_cpu}))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGITKIT_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "digitkit", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--cache-size", "0", "--audit-db", f"sqlite:///{tmp / 'http.db'}",
           "--log-level", "warning", "--engine", args.engine, "--settings", str(settings)]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server was not ready after 120 s:\n{log_path.read_text()}")


def raw_request(route: str, kwargs: dict[str, Any]) -> bytes:
    """One request as the bytes a client writes: request line, headers, body (httpx only encodes it, once)."""
    headers = {"X-API-Key": API_KEY, **kwargs.get("headers", {})}
    request = httpx.Request("POST", f"http://127.0.0.1{route}", **{**kwargs, "headers": headers})
    body = request.read()
    head = f"POST {route} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    return head.encode() + body


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bool]:
    """Read one HTTP/1.1 response (Content-Length bodies only, which is all the server sends for these routes):
    (status, whether the server closes the connection)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the header")
        buf += chunk
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    length = int(fields.get("content-length", "0"))
    while len(buf) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        buf += chunk
    del buf[: end + 4 + length]
    return status, fields.get("connection", "").lower() == "close"


def socket_client(port: int, requests: list[bytes], start_at: float, time_limit: float) -> dict[str, Any]:
    """One client process: the requests in turn on one keep-alive connection (a new one if the server closes it),
    from `start_at` (time.monotonic, shared by the processes) for at most `time_limit` s."""
    while time.monotonic() < start_at:
        time.sleep(0.001)
    lat: list[float] = []
    errors, sock, buf = 0, None, bytearray()
    t_start = time.monotonic()
    deadline = t_start + time_limit
    for req in requests:
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf.clear()
            sock.sendall(req)
            status, close = _read_response(sock, buf)
        except (OSError, ValueError, IndexError):
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
            continue
        if status == 200:
            lat.append(time.perf_counter() - t0)
        else:
            errors += 1
        if close:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return {"lat": lat, "errors": errors, "start": t_start, "end": time.monotonic()}


def load(pool: Any, port: int, reqs: Requests, form: str, n: int, clients: int, offset: int, time_limit: float
         ) -> dict:  # fmt: skip
    """n requests of one form from `clients` processes of `pool` (client c sends requests c, c + clients, ...). The
    pool's processes are started once, before any scenario (`client_pool`): each task blocks its process until
    `start_at` and then for its whole run, so every client of a scenario has a process of its own."""
    encoded = [raw_request(*reqs.kwargs(form, offset + i)) for i in range(n)]
    start_at = time.monotonic() + 0.2 + 0.05 * clients  # every process has its task before the first request
    parts = pool.starmap(socket_client, [(port, encoded[c::clients], start_at, time_limit) for c in range(clients)],
                         chunksize=1)  # fmt: skip
    lat = [x for p in parts for x in p["lat"]]
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    return summary(lat, wall, FORMS[form], sum(p["errors"] for p in parts))


def _pid(_: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def wait_for_clients(pool: Any, n: int, timeout_s: float = 120.0) -> None:
    """Until each of the pool's n processes has answered (its imports done), so none is still starting when the
    first scenario is timed."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {n} client processes started within {timeout_s:g} s")
        seen.update(pool.map(_pid, range(4 * n), chunksize=1))


def over_http(model: str, reqs: Requests, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    proc, url, log_path = start_server(model, tmp, args)
    port = int(url.rsplit(":", 1)[1])
    results: dict[str, Any] = {}
    # Spawned (as every process digitkit starts: the same on Linux, macOS and Windows), once: a spawned process
    # imports this script again, which takes seconds, so the clients are started before anything is timed.
    pool = multiprocessing.pool.Pool(max(args.clients), context=multiprocessing.get_context("spawn"))
    try:
        wait_for_clients(pool, max(args.clients))
        for form in FORMS:
            n = count_for(form, args.requests)
            load(pool, port, reqs, form, min(20, n), 1, 10_000, args.time_limit)  # warm-up
            for clients in args.clients:
                repeats = [load(pool, port, reqs, form, n, clients, rep * n, args.time_limit)
                           for rep in range(args.repeats)]  # fmt: skip
                results[f"http/{form}/c{clients}"] = median_of(repeats)
    finally:
        pool.terminate()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    if "Traceback" in log_path.read_text(errors="replace"):
        print(f"warning: the server logged a traceback; see {log_path}", file=sys.stderr)
    return results


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "latest"), help="run folder or checkpoint")
    p.add_argument("--requests", type=int, default=400, help="single-image requests per scenario and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--workers", type=int, default=1, help="server processes for the HTTP runs")
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds per scenario and repeat, at most")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="the server's engine; onnx needs `digitkit export RUN` first (RUN/export/model.onnx)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="the server's batching.wait_ms (micro-batching of single-image requests; 0 turns it off)")
    p.add_argument("--http", choices=["auto", "httptools", "h11"], default="auto",
                   help="the server's HTTP parser (settings http; auto: httptools when installed)")
    p.add_argument("--no-pin-cpu", dest="pin_cpu", action="store_false",
                   help="let the OS move the server's threads between cores (settings pin_cpu: false)")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args()

    torch.set_num_threads(1)
    reqs = Requests(test_digits(2000))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        # In-process, this process is the server: pinned to one core as `digitkit serve` pins its workers
        # (settings pin_cpu), then set free again before the client processes (which inherit it) are started.
        free = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if args.pin_cpu:
            from digitkit.serve.cpu import pin_to_one_core

            pin_to_one_core()
        try:
            results = in_process(args.model, reqs, args, Path(tmp))
        finally:
            if free is not None:
                os.sched_setaffinity(0, free)
        if not args.skip_http:
            results.update(over_http(args.model, reqs, args, Path(tmp)))

    print(f"{'scenario':22s} {'req':>6s} {'err':>4s} {'req/s':>8s} {'img/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} "
          f"{'p99 ms':>8s}")  # fmt: skip
    stage_ms = results.pop("stages_p50_ms")
    for name, r in results.items():
        print(f"{name:22s} {r['requests']:>6d} {r['errors']:>4d} {r['requests_per_s']:>8,.1f} "
              f"{r['images_per_s']:>9,.0f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f}")  # fmt: skip
    # The overheads, as differences of medians: the ASGI app around the service, the HTTP server around the app.
    stage_ms["asgi_overhead"] = round(results["asgi/png"]["p50_ms"] - results["service/png"]["p50_ms"], 3)
    if "http/png/c1" in results:
        stage_ms["http_overhead"] = round(results["http/png/c1"]["p50_ms"] - results["asgi/png"]["p50_ms"], 3)
    stage_ms["service_png"] = results["service/png"]["p50_ms"]
    print("one PNG answer, p50 by stage: " + ", ".join(f"{k} {v:.3f} ms" for k, v in stage_ms.items()))
    errors = sum(r["errors"] for r in results.values())
    aim: dict[str, Any] = {"errors": errors}
    checks = [("png_in_process_p50_ms", "asgi/png", "p50_ms", 1.5, "<="),
              ("png_http_1_client_p50_ms", "http/png/c1", "p50_ms", 2.5, "<="),
              ("png_http_8_clients_requests_per_s", "http/png/c8", "requests_per_s", 1000, ">="),
              ("batch256_in_process_images_per_s", "asgi/batch256", "images_per_s", 3000, ">="),
              ("batch256_http_1_client_images_per_s", "http/batch256/c1", "images_per_s", 3000, ">=")]  # fmt: skip
    for key, scenario, figure, target, how in checks:
        if scenario not in results:
            continue
        value = results[scenario][figure]
        met = (value <= target if how == "<=" else value >= target) and errors == 0
        aim[key] = {"value": value, "aim": f"{how} {target:g}", "met": met}
        print(f"aim {key} {how} {target:g}: {value:g} -> {'met' if met else 'NOT met'}")
    result = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", *sys.argv]),
        "model": str(Path(args.model).resolve()),
        "requests": args.requests,
        "repeats": args.repeats,
        "clients": args.clients,
        "workers": args.workers,
        "pin_cpu": args.pin_cpu,
        "http": args.http,
        "engine": args.engine,
        "batch_wait_ms": args.batch_wait_ms,
        "http_clients": "separate processes, one raw keep-alive socket each, requests encoded beforehand",
        "time_limit_s": args.time_limit,
        "statistic": "median over repeats of each repeat's figure (counts summed)",
        "cache": "off (cache_size 0): every answer computed",
        "aim": aim,
        "stages_p50_ms": stage_ms,
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
