"""The REST API and the drawing page: thin routes over digitkit.serve.service.

`create_app(settings)` builds the app; the model is loaded in the lifespan (never at import). Every error a
client can cause is a 4xx with a JSON body {"error": ..., "detail": ...}; a 500 means a bug in digitkit.

Routes (all JSON unless said):
  POST /v1/predict         one image: multipart file, raw image body, or JSON {"image": base64} / {"pixels": rows}
  POST /v1/predict/batch   up to limits.max_batch images: multipart files or JSON {"images": [...]}
  POST /v1/read            a row of digits -> string (the row reader when one is configured, else the model's digits)
  POST /v1/explain         prediction + saliency / Grad-CAM overlays (base64 PNG)
  POST /v1/feedback        {request_id, true_label}
  GET  /v1/model, /v1/alerts, /healthz, /readyz, /metrics (Prometheus text)
  POST /v1/admin/reload, GET /v1/admin/audit/export, GET /v1/admin/audit/stats   (admin token)
  GET  /                   the drawing page (assets under /static, no CDN)
  GET  /docs, /redoc        the API reference (Swagger UI, ReDoc), served from this server: no CDN

The event loop only moves bytes: every decode, parse, preprocess, model call, audit write and response rendering
runs in the worker's thread pool (`work`), under a deadline. What a request may cost is bounded before any work
starts (body size and deadline, pixels, frames, batch size, pattern size), and what the server holds at once is
bounded too (connections and header deadline in digitkit.serve.protocol, requests in flight in `Guard`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from digitkit import __version__
from digitkit.errors import DataError, plain_message
from digitkit.serve import protocol, schemas
from digitkit.serve.alerts import Alerts, Reference, Webhook, card_accuracy
from digitkit.serve.metrics import CONTENT_TYPE
from digitkit.serve.service import Input, Job, Service, ServiceError
from digitkit.serve.settings import SETTINGS_ENV, LimitSettings, ServeSettings

log = logging.getLogger("digitkit.serve")
T = TypeVar("T")
STATIC = resources.files("digitkit.serve") / "static"
DOCS_ASSETS = resources.files("fastapi_offline") / "static"
"""Swagger UI and ReDoc's scripts and styles, shipped by the fastapi-offline package: /docs and /redoc load nothing
from a CDN, so they work offline and behind a strict firewall."""
DOCS_ASSETS_URL = "/static/api-docs"
IMAGE_FORMS = {
    "application/json": {"schema": {"$ref": "#/components/schemas/{model}"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format":
                            "binary"}}, "required": ["file"]}},  # fmt: skip
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
}
ERRORS = {code: {"model": schemas.ErrorOut} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)}


def _body_doc(model: type[BaseModel], multipart_files: bool = False) -> dict[str, Any]:
    """OpenAPI for a body that may come as JSON, multipart or a raw image (parsed by hand in `_parse`)."""
    content = json.loads(json.dumps(IMAGE_FORMS).replace("{model}", model.__name__))
    if multipart_files:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {"files": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}}  # fmt: skip
        for raw in ("image/png", "image/jpeg"):
            content.pop(raw)
    return {"requestBody": {"required": True, "content": content}}


def _publish_body_models(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Define the body models `_body_doc` refers to in /openapi.json's components: the routes read their bodies by
    hand, so FastAPI never sees these models and would publish dangling $refs."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = build().setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------ middleware
FREE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Cheap routes that answer even when the server is at its in-flight limit (so health checks see the truth)."""
IMAGE_ROUTES = frozenset({"/v1/predict", "/v1/predict/batch", "/v1/read", "/v1/explain"})
"""Routes whose bodies may be up to limits.max_request_bytes; every other route's body is a small JSON document."""
SMALL_BODY_BYTES = 64 * 1024
MAX_ERRORS_SHOWN = 20
"""Validation errors listed in a 422 (a million bad pixels would otherwise make a response of megabytes)."""


class BodyRefused(StarletteHTTPException):
    """A body over its size limit (413) or slower than its deadline (408). An HTTPException, so FastAPI's own body
    parsing passes it through unchanged; the connection is closed after the answer (the rest is never read)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail, headers={"Connection": "close"})
        self.error = "request too large" if status == 413 else "request body timeout"


class Guard:
    """Per request: the in-flight limits, per worker and per client address (503 + Retry-After beyond them: a request
    counts from its header, so the bodies held in memory are bounded too), the body size limit (by Content-Length before
    reading, and while it streams in) and the body deadline (limits.body_timeout_s from the header). Also notes a
    client that disconnected before its answer (scope["digitkit.disconnected"]) for the metrics."""

    def __init__(self, app: Any, limits: LimitSettings) -> None:
        self.app, self.limits = app, limits
        self.inflight = 0
        self.by_client: dict[str, int] = {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.limits.max_request_bytes if path in IMAGE_ROUTES else SMALL_BODY_BYTES
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_error(send, 413, "request too large", _size_detail(declared.decode(errors="replace"),
                                                                                   limit, path))  # fmt: skip
        counted = path not in FREE_ROUTES
        client = scope["client"][0] if scope.get("client") else ""
        if counted and self.inflight >= self.limits.max_inflight:
            return await _send_error(send, 503, "server busy",
                                     f"this worker is answering {self.inflight} requests, its limit "
                                     "(limits.max_inflight); retry in a second", {"retry-after": "1"})  # fmt: skip
        if counted and self.by_client.get(client, 0) >= self.limits.max_inflight_per_client:
            return await _send_error(send, 503, "too many requests from this client",
                                     f"this worker is answering {self.by_client[client]} requests from your address, "
                                     "its limit (limits.max_inflight_per_client); wait for their answers or retry "
                                     "in a second", {"retry-after": "1"})  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        seen, body_done, answered = 0, False, False

        async def guarded_receive() -> dict:
            nonlocal seen, body_done
            if body_done:
                message = await receive()
            else:
                try:
                    message = await _within(receive(), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    raise BodyRefused(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} "
                                      "s (limits.body_timeout_s); send it faster or smaller") from None  # fmt: skip
            if message["type"] == "http.disconnect":
                # uvicorn also says "disconnect" once a response is complete (a streaming response listens for it):
                # only a client that left before its answer counts.
                if not answered:
                    scope["digitkit.disconnected"] = True
                return message
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyRefused(413, _size_detail(f"more than {seen:,}", limit, path))
            body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        if counted:
            self.inflight += 1
            self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            await self.app(scope, guarded_receive, tracking_send)
        finally:
            if counted:
                self.inflight -= 1
                left = self.by_client[client] - 1
                if left:
                    self.by_client[client] = left
                else:
                    del self.by_client[client]


async def _within(awaitable: Any, seconds: float) -> Any:
    """`await awaitable`, or TimeoutError after `seconds`: asyncio.timeout where Python has it (3.11), which costs
    a timer where wait_for (3.10) wraps the awaitable in a task."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _size_detail(size: str, limit: int, path: str) -> str:
    if path in IMAGE_ROUTES:
        return (f"the request body is {size} bytes; this server accepts at most {limit:,} (limits.max_request_bytes); "
                "send a smaller image or fewer images per batch")  # fmt: skip
    return f"the request body is {size} bytes; {path} takes a small JSON document of at most {limit:,} bytes"


class RequestMetrics:
    """Every response counted once, by route and its real status, with its latency; a client that went away before
    its answer is counted as a disconnect, not as an error (pure ASGI: cheaper than BaseHTTPMiddleware). The
    outermost layer, so the Guard's refusals and the error handlers' answers are all seen."""

    def __init__(self, app: Any, state: Any, paths: Callable[[], frozenset[str]]) -> None:
        self.app, self.state, self.paths = app, state, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        t0, status = loop.time(), [0]

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            service = getattr(self.state, "service", None)
            if service is not None:
                route = getattr(scope.get("route"), "path", None)
                if route is None:
                    route = scope["path"] if scope["path"] in self.paths() else "unmatched"
                if scope.get("digitkit.disconnected"):  # gone before its answer: whatever we sent, nobody read it
                    service.metrics.client_disconnects.labels(route).inc()
                else:
                    service.metrics.requests.labels(route, str(status[0] or 500)).inc()
                    service.metrics.latency.labels(route).observe(loop.time() - t0)


async def _send_error(send: Callable, status: int, error: str, detail: Any, headers: dict[str, str] | None = None
                      ) -> None:  # fmt: skip
    body = json.dumps({"error": error, "detail": detail}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


QUICK_BODY_BYTES = 32 * 1024
"""A single image sent in at most this many bytes (a 28x28 PNG is under 1 kB, a drawing-page canvas a few kB, 28x28
JSON pixels about 3 kB) is quick work: it goes to the quick lane."""


class Worker:
    """The threads that do every request's work, in two lanes: `quick`, one thread for small single images (on 2
    cores, one thread answering them in turn serves more of them per second than several contending for the GIL:
    256 against 148 PNG requests/s from 4 clients, benchmarks/serve_load.py), and `pool`, `threads` threads for
    the rest (batches, large photos, rows, explanations), so a large job never queues a small one behind it.

    Jobs not finished yet are counted: a job whose request timed out keeps its thread until it ends (threads cannot
    be killed), so new work is refused (503) while that count is at the limit instead of queueing without bound."""

    def __init__(self, threads: int, max_pending: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="digitkit-work")
        self.quick = ThreadPoolExecutor(1, thread_name_prefix="digitkit-quick")
        self.max_pending = max_pending
        self.pending = 0
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Count one more job, or refuse it (503) when too many are still running or queued."""
        with self._lock:
            if self.pending >= self.max_pending:
                raise ServiceError(503, "server busy", f"{self.pending} jobs are still running on this worker (some "
                                   "of them for requests that timed out); retry in a second")  # fmt: skip
            self.pending += 1

    async def run(self, timeout_s: float, fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        self.admit()
        try:
            future = (self.quick if quick else self.pool).submit(fn, *args)
        except RuntimeError:  # shutting down
            self.release(None)
            raise ServiceError(503, "shutting down", "the server is stopping; retry on another instance") from None
        future.add_done_callback(self.release)
        return await _await(future, timeout_s)

    def release(self, _: Any = None) -> None:
        """One job fewer (a future's done callback, or a job that never started)."""
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        for pool in (self.quick, self.pool):
            pool.shutdown(wait=False, cancel_futures=True)


async def _await(future: Future, timeout_s: float) -> Any:
    """A job's result, or 408 after `timeout_s` (the job itself runs on: threads cannot be stopped)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except TimeoutError:
        raise ServiceError(408, "request timeout",
                           f"the request took longer than {timeout_s:g} s (limits.request_timeout_s); send a "
                           "smaller image or batch") from None  # fmt: skip


class Ticket:
    """A request on its way to the Batcher: counted from its header until it is queued (or gives up)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.counted = batcher, True

    def withdraw(self) -> None:
        """No longer on the way (queued, sent elsewhere or failed); a second call does nothing."""
        if self.counted:
            self.counted = False
            self.batcher.arriving -= 1


class Batcher:
    """Micro-batching of single-image predictions, in one thread (it replaces the quick lane for them): each batch
    takes every request queued, and, while other requests are known to be on their way (`Ticket`: header read,
    body still coming or being handed over), waits for them up to `wait_s`, up to `max_jobs` requests. A request
    that arrives alone never waits. `run_batch(payloads)` answers a batch with one result per payload, a value or
    an exception; should it raise, each request of the batch is run again on its own, so the failure reaches only
    the request that caused it. Every job counts against the Worker's pending limit (503 beyond it) from the
    moment it is queued until it ends, and each request waits for its answer under its own timeout.

    On 2 cores one thread is also the right number: the forward pass of a batch of 8 costs little more than one of
    1, and one thread answering batches in turn does not fight the event loop's thread for the GIL."""

    def __init__(self, worker: Worker, run_batch: Callable[[list[Any]], list[Any]], wait_s: float,
                 max_jobs: int) -> None:  # fmt: skip
        self.worker, self.run_batch = worker, run_batch
        self.wait_s, self.max_jobs = wait_s, max_jobs
        self.arriving = 0
        """Tickets out: changed on the event loop's thread only, read by the batch thread (a plain int under the
        GIL; a stale read only makes a batch wait a little longer or shorter, never past wait_s)."""
        self.queue: deque[tuple[Any, Future]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches = 0
        self.jobs = 0
        self.thread = threading.Thread(target=self._loop, name="digitkit-batch", daemon=True)
        self.thread.start()

    def arrive(self) -> Ticket:
        self.arriving += 1
        return Ticket(self)

    async def submit(self, timeout_s: float, ticket: Ticket, payload: Any) -> Any:
        self.worker.admit()
        future: Future = Future()
        future.add_done_callback(self.worker.release)
        with self.cond:
            ticket.withdraw()
            if self.closed:
                future.set_exception(ServiceError(503, "shutting down", "the server is stopping; retry on another "
                                                  "instance"))  # fmt: skip
            else:
                self.queue.append((payload, future))
                self.cond.notify()
        return await _await(future, timeout_s)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                batch = [self.queue.popleft()]
                deadline = time.monotonic() + self.wait_s
                while self.wait_s > 0 and len(batch) < self.max_jobs:
                    if self.queue:
                        batch.append(self.queue.popleft())
                        continue
                    left = deadline - time.monotonic()
                    if self.arriving <= 0 or left <= 0:
                        break
                    self.cond.wait(left)
            live = [(payload, future) for payload, future in batch if future.set_running_or_notify_cancel()]
            if live:  # (a request that timed out while queued was cancelled: nobody waits for it)
                self._run(live)

    def _run(self, live: list[tuple[Any, Future]]) -> None:
        payloads = [payload for payload, _ in live]
        self.batches += 1
        self.jobs += len(live)
        try:
            results = self.run_batch(payloads)
        except Exception as e:  # noqa: BLE001 - delivered to the request(s) concerned, as the pool would
            results = [e] if len(live) == 1 else [self._alone(payload) for payload in payloads]
        for (_, future), result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _alone(self, payload: Any) -> Any:
        try:
            return self.run_batch([payload])[0]
        except Exception as e:  # noqa: BLE001 - see _run
            return e

    def close(self) -> None:
        with self.cond:
            self.closed = True
            while self.queue:
                _, future = self.queue.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(ServiceError(503, "shutting down", "the server is stopping; retry on "
                                                      "another instance"))  # fmt: skip
            self.cond.notify_all()
        self.thread.join(timeout=5)


async def _watch_loop_lag(state: Any, period_s: float = 0.02) -> None:
    """How late the event loop wakes up, every `period_s`: a lag over a few ms means something held the loop (the
    histogram digitkit_event_loop_lag_seconds; the aim is that nothing holds it for 50 ms)."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        service = getattr(state, "service", None)
        if service is not None:
            service.metrics.loop_lag.observe(max(loop.time() - t0 - period_s, 0.0))


def _alert_reference(loaded: Any, settings: ServeSettings) -> Reference:
    return card_accuracy(loaded.model_dir, loaded.info.metrics, loaded.info.checkpoint_sha256,
                         settings.alerts.reference_accuracy)  # fmt: skip


def _start_alerts(service: Service, settings: ServeSettings) -> tuple[Alerts, Webhook | None]:
    """The alert windows of the model being served, and the webhook thread when alerts.webhook_url is set."""
    cfg = settings.alerts
    hook = Webhook(cfg.webhook_url, cfg, f"digitkit/{__version__}") if cfg.webhook_url else None
    loaded = service.loaded
    alerts = Alerts(cfg, _alert_reference(loaded, settings), loaded.baseline.latency_ms, loaded.info.classes,
                    loaded.info.version, notify=hook.send if hook else None)  # fmt: skip
    log.info("alerts: accuracy reference %s (%s), latency baseline %.2f ms, webhook %s", alerts.reference.accuracy,
             alerts.reference.source, loaded.baseline.latency_ms or 0.0, hook.where if hook else "off")  # fmt: skip
    return alerts, hook


def _feed(fn: Callable[..., None], *args: Any) -> None:
    """Feed the alerts without ever failing the request that brought the data."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - monitoring must not turn an answer into a 500
        log.exception("alerts: could not record an observation")


def error_response(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app
def create_app(settings: ServeSettings) -> FastAPI:
    limits = settings.limits
    worker = Worker(limits.worker_threads, max_pending=limits.max_inflight + limits.worker_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loop = asyncio.get_running_loop()
        app.state.service = await loop.run_in_executor(worker.pool, Service, settings)
        app.state.alerts, app.state.webhook = _start_alerts(app.state.service, settings)
        log.info("serving %s on %d torch thread(s), %d work thread(s)", app.state.service.info.version,
                 settings.threads, limits.worker_threads)  # fmt: skip
        # Everything loaded so far (torch, the model, numpy) lives as long as the process: moved out of the garbage
        # collector's sight, so that a full collection does not pause the event loop for 100 ms and more.
        gc.collect()
        gc.freeze()
        lag = asyncio.create_task(_watch_loop_lag(app.state))
        try:
            yield
        finally:
            gc.unfreeze()  # an app in a longer-lived process (tests, an embedding program) gives its objects back
            lag.cancel()
            if app.state.webhook is not None:
                app.state.webhook.close()
            batcher.close()  # requests still queued get 503; the batch running now ends first
            service, app.state.service = app.state.service, None
            service.close()
            worker.close()

    app = FastAPI(title="digitkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Handwritten-digit recognition: predict, read, explain, feedback.")  # fmt: skip
    app.state.service = None
    app.state.alerts, app.state.webhook = None, None
    app.state.max_connections = protocol.configure(limits.max_connections, limits.max_connections_per_client,
                                                   limits.header_timeout_s, limits.backlog,
                                                   lambda reason: _count_refused(app.state, reason),
                                                   limits.max_header_bytes)  # fmt: skip
    paths: set[str] = set()
    app.add_middleware(Guard, limits=limits)
    app.add_middleware(RequestMetrics, state=app.state, paths=lambda: paths)  # outermost: sees every answer
    _add_error_handlers(app)
    _publish_body_models(app, (schemas.PredictIn, schemas.BatchIn, schemas.ReadIn, schemas.ExplainIn))

    def service() -> Service:
        svc = app.state.service
        if svc is None:
            raise ServiceError(503, "not ready", "the model is still loading; retry in a moment (see /readyz)")
        return svc

    # Dependencies are async on purpose: FastAPI runs a sync dependency in the thread pool, a hop that costs more
    # than the check itself.
    async def api_key(request: Request) -> None:
        _check_secret(request, settings.api_key, "API key", "X-API-Key")

    async def admin(request: Request) -> None:
        if settings.admin_token is None:
            raise ServiceError(403, "admin routes disabled",
                               "this server has no admin token; restart it with DIGITKIT_ADMIN_TOKEN set "
                               "(or --admin-token-file) to use admin routes")  # fmt: skip
        _check_secret(request, settings.admin_token, "admin token", "X-Admin-Token")

    def observe_answers(results: list[dict[str, Any]]) -> None:
        """Each computed answer's latency to the alerts (cache hits and unreadable inputs say nothing of the model)."""
        alerts = app.state.alerts
        if alerts is None:
            return
        for out in results:  # at most limits.max_batch
            if not out.get("cached") and out.get("rejected") != "unreadable" and out.get("latency_ms") is not None:
                _feed(alerts.observe_latency, out["latency_ms"])

    async def work(fn: Callable[..., T], *args: Any, quick: bool = False) -> T:
        return await worker.run(limits.request_timeout_s, fn, *args, quick=quick)

    async def answer(request: Request, model: type[BaseModel], single: bool, fn: Callable[[Any, list[Input]], Any]
                     ) -> Response:  # fmt: skip
        """Read the body (the only part on the event loop), then parse, compute and render in one job."""
        raw, form_inputs = await _read_body(request, limits, single)
        service()  # not ready: 503 before any work

        def job() -> Response:
            body, inputs = _parse(raw, form_inputs, request.headers, model, limits, single)
            return JSONResponse(fn(body, inputs))

        size = len(raw) if raw is not None else sum(len(i.data) for i in form_inputs or [])
        return await work(job, quick=single and size <= QUICK_BODY_BYTES)

    def run_predictions(payloads: list[tuple[bytes | None, list[Input] | None, Any, str]]) -> list[Any]:
        """Single-image requests (raw body or form files, headers, client) -> a response or a ServiceError each: parsed
        one by one (a bad body fails only its own request), then answered together (Service.predict_jobs: one forward
        pass, one audit transaction) and rendered. Runs in the Batcher's thread, or in the pool for a large image."""
        out: list[Any] = [None] * len(payloads)
        jobs, where = [], []
        for i, (raw, form_inputs, headers, client) in enumerate(payloads):
            try:
                body, inputs = _parse(raw, form_inputs, headers, schemas.PredictIn, limits, True)
            except ServiceError as e:
                out[i] = e
                continue
            route = "preview" if body.preview else "predict"
            jobs.append(Job(inputs, route, client, body.top_k, body.return_input, strict=True))
            where.append(i)
        if jobs:
            svc = service()
            svc.metrics.batch_requests.observe(len(jobs))
            for i, job, result in zip(where, jobs, svc.predict_jobs(jobs), strict=True):
                if isinstance(result, ServiceError):
                    out[i] = result
                    continue
                if job.route != "preview":  # as the drift window: a preview of a half-drawn digit is not traffic
                    observe_answers(result)
                out[i] = JSONResponse(result[0])
        return out

    batcher = Batcher(worker, run_predictions, settings.batching.wait_ms / 1000, settings.batching.max_images)
    app.state.batcher = batcher

    def predict_alone(payload: tuple[bytes | None, list[Input] | None, Any, str]) -> Response:
        result = run_predictions([payload])[0]
        if isinstance(result, Exception):
            raise result
        return result

    # ----------------------------------------------------------------------------------- prediction
    # The busiest route checks its key in its body, first thing, instead of through Depends: FastAPI's dependency
    # machinery costs more than the check (tests/test_serve.py holds it to the same 401s as the other routes).
    @app.post("/v1/predict", response_model=schemas.Prediction, responses=ERRORS,
              openapi_extra=_body_doc(schemas.PredictIn), tags=["predict"])  # fmt: skip
    async def predict(request: Request) -> Response:
        """Predict one digit. Send a multipart `file`, a raw image body, or JSON with `image` or `pixels`."""
        _check_secret(request, settings.api_key, "API key", "X-API-Key")
        ticket = batcher.arrive()  # on its way: a micro-batch may wait for it
        try:
            raw, form_inputs = await _read_body(request, limits, True)
            service()  # not ready: 503 before any work
            payload = (raw, form_inputs, request.headers, _client(request))
            size = len(raw) if raw is not None else sum(len(i.data) for i in form_inputs or [])
            if size > QUICK_BODY_BYTES:  # a photo may take tens of ms: in the pool, not ahead of small images
                ticket.withdraw()
                return await work(predict_alone, payload)
            return await batcher.submit(limits.request_timeout_s, ticket, payload)
        finally:
            ticket.withdraw()

    @app.post("/v1/predict/batch", response_model=schemas.BatchOut, responses=ERRORS,
              dependencies=[Depends(api_key)], openapi_extra=_body_doc(schemas.BatchIn, multipart_files=True),
              tags=["predict"])  # fmt: skip
    async def predict_batch(request: Request) -> Response:
        """Predict up to `max_batch` images, answered in order; an unreadable one gets `rejected: unreadable`."""
        client = _client(request)

        def run(body: Any, inputs: list[Input]) -> Any:
            t0 = time.perf_counter()
            results = service().predict(inputs, "batch", client, body.top_k, body.return_input)
            observe_answers(results)
            return {"results": results, "count": len(results),
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}  # fmt: skip

        return await answer(request, schemas.BatchIn, False, run)

    @app.post("/v1/read", response_model=schemas.ReadOut, responses=ERRORS, dependencies=[Depends(api_key)],
              openapi_extra=_body_doc(schemas.ReadIn), tags=["predict"])  # fmt: skip
    async def read(request: Request) -> Response:
        """Read a row of handwritten digits (an amount, a postcode) as a string, with one result per digit.
        `pattern` is checked in linear time (digitkit.realworld.pattern: a safe subset of regular expressions)."""
        client = _client(request)
        return await answer(request, schemas.ReadIn, True,
                            lambda body, inputs: service().read(inputs[0], client, body.pattern))

    @app.post("/v1/explain", response_model=schemas.ExplainOut, responses=ERRORS, dependencies=[Depends(api_key)],
              openapi_extra=_body_doc(schemas.ExplainIn), tags=["predict"])  # fmt: skip
    async def explain(request: Request) -> Response:
        """The prediction plus heat maps of the pixels that drove it (saliency, Grad-CAM, ...)."""
        client = _client(request)
        return await answer(request, schemas.ExplainIn, True, lambda body, inputs: service().explain(
            inputs[0], client, list(dict.fromkeys(body.methods))))

    @app.post("/v1/feedback", response_model=schemas.FeedbackOut, responses=ERRORS,
              dependencies=[Depends(api_key)], tags=["predict"])  # fmt: skip
    async def feedback(body: schemas.FeedbackIn) -> Response:
        """Tell the server the true label of an earlier prediction; feeds live accuracy and retraining data."""
        svc = service()

        def job() -> dict[str, Any]:
            out = svc.feedback(body.request_id, body.true_label)
            if app.state.alerts is not None:
                _feed(app.state.alerts.observe_feedback, out["predicted"], out["true_label"], out["request_id"])
            return out

        return JSONResponse(await work(job, quick=True))

    # ----------------------------------------------------------------------------------- information
    @app.get("/v1/model", response_model=schemas.ModelOut, responses=ERRORS, tags=["info"])
    async def model() -> Response:
        """Name, version, checkpoint hash, metrics, and the preprocessing contract; `reader`: what answers /v1/read."""
        loaded = service().loaded  # the model and its reader from one load, even if a reload happens meanwhile
        out = {k: v for k, v in loaded.info.__dict__.items() if k != "config"}
        out["drift_baseline"] = {**loaded.baseline.to_json(), "latency_ms": loaded.baseline.latency_ms}
        out["reader"] = loaded.reader_info.to_json()
        out["alerts"] = app.state.alerts.summary() if app.state.alerts is not None else None
        return JSONResponse(out)

    @app.get("/v1/alerts", response_model=schemas.AlertsOut, responses=ERRORS, tags=["info"])
    async def alerts() -> Response:
        """Each alert's state (firing, value, threshold, the count it rests on, since when) and the webhook's counts."""
        service()  # not ready: 503
        state, hook = app.state.alerts.snapshot(), app.state.webhook
        state["webhook"] = {**hook.outcomes, "pending": hook.pending(), "url": hook.where} if hook else None
        return JSONResponse(state)

    @app.get("/healthz", tags=["info"])
    async def healthz() -> dict[str, str]:
        """The process is up (it may still be loading the model)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": schemas.ErrorOut}}, tags=["info"])
    async def readyz() -> Response:
        """Ready to answer predictions."""
        svc = service()
        return JSONResponse({"status": "ready", "model_version": svc.info.version})

    @app.get("/metrics", response_class=Response, tags=["info"])
    async def metrics() -> Response:
        """Prometheus text format."""
        svc = service()

        def render() -> bytes:
            svc.refresh_live_metrics()
            if app.state.alerts is not None:
                hook = app.state.webhook
                svc.metrics.set_live(alerts=app.state.alerts.snapshot()["alerts"],
                                     alert_webhook=dict(hook.outcomes) if hook else None)  # fmt: skip
            return svc.metrics.render()

        return Response(await work(render), media_type=CONTENT_TYPE)

    # ----------------------------------------------------------------------------------- admin
    @app.post("/v1/admin/reload", response_model=schemas.ModelOut, responses=ERRORS,
              dependencies=[Depends(admin)], tags=["admin"])  # fmt: skip
    async def reload(body: schemas.ReloadIn | None = None) -> Response:
        """Load the model again (or another one) and swap it in; the old one serves until the new one is ready."""
        svc = service()
        # Not under the request timeout: loading a model may take longer, and the old one serves meanwhile. The row
        # reader (settings.reader) is loaded again with it, from the same path.
        loaded = await asyncio.get_running_loop().run_in_executor(worker.pool, svc.reload_loaded,
                                                                  body.model if body else None)  # fmt: skip
        if app.state.alerts is not None:  # the new model's reference accuracy; the windows start again
            app.state.alerts.reset(_alert_reference(loaded, settings), loaded.baseline.latency_ms,
                                   loaded.info.classes, loaded.info.version)  # fmt: skip
        return JSONResponse({**{k: v for k, v in loaded.info.__dict__.items() if k != "config"},
                             "reader": loaded.reader_info.to_json()})  # fmt: skip

    @app.get("/v1/admin/audit/stats", responses=ERRORS, dependencies=[Depends(admin)], tags=["admin"])
    async def audit_stats() -> Response:
        """Totals, rejection rate, latency percentiles and labelled accuracy from the audit log."""
        svc = service()
        return JSONResponse(await work(svc.audit.stats))

    @app.get("/v1/admin/audit/export", responses=ERRORS, dependencies=[Depends(admin)], tags=["admin"])
    async def audit_export(format: str = "jsonl", labelled: bool = False) -> Response:  # noqa: A002 - the query name
        """The audit log as CSV or JSON lines (streamed)."""
        if format not in ("csv", "jsonl"):
            raise ServiceError(422, "unknown format", f"format={format!r}; expected csv or jsonl")
        svc = service()
        spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        # A whole-table export is not bounded by the request timeout: it streams what it wrote, however long.
        await asyncio.get_running_loop().run_in_executor(worker.pool, svc.audit.export, spool, format, labelled)
        spool.seek(0)
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(_drain(spool), media_type=media)

    # ----------------------------------------------------------------------------------- the pages
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _local_only(get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="digitkit API",
                                   swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg"))  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _local_only(get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title="digitkit API",
                                          redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
                                          redoc_favicon_url="/static/favicon.svg", with_google_fonts=False))

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(DOCS_ASSETS)), name="api-docs-assets")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    paths.update(getattr(r, "path", "") for r in app.routes)
    return app


DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "connect-src 'self'")  # fmt: skip
"""The API reference pages load from this server only (ReDoc would fetch its logo from a CDN)."""


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def _count_refused(state: Any, reason: str) -> None:
    service = getattr(state, "service", None)
    if service is not None:
        service.metrics.connections_refused.labels(reason).inc()


def app_from_env() -> FastAPI:
    """The factory uvicorn's workers call (`digitkit serve --workers N`)."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with `digitkit serve`")
    from digitkit.serve.cpu import pin_to_one_core
    from digitkit.serve.settings import from_dict

    settings = from_dict(json.loads(raw))
    if settings.pin_cpu:  # each worker a core of its own, in turn (the metrics folder is the workers' shared one)
        pin_to_one_core(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    return create_app(settings)


def _drain(spool: Any) -> Iterator[str]:
    with spool:
        while chunk := spool.read(1 << 16):
            yield chunk


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _check_secret(request: Request, expected: str | None, what: str, header: str) -> None:
    if expected is None:
        return
    given = request.headers.get(header)
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # compare_digest: the time taken does not reveal how many leading characters matched.
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ServiceError(401, "unauthorized",
                           f"{'missing' if given is None else 'wrong'} {what}: send it in the {header} header "
                           "or as Authorization: Bearer <key>")  # fmt: skip


# ------------------------------------------------------------------------------------------ request parsing
async def _read_body(request: Request, limits: Any, single: bool) -> tuple[bytes | None, list[Input] | None]:
    """The part of reading a request that runs on the event loop: its bytes (JSON or a raw image), or the files of a
    multipart form; everything else (parsing, validation, decoding) is `_parse`, in the worker pool."""
    ctype = _content_type(request.headers)
    if ctype == "application/json":
        return await request.body(), None
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_batch + 1, max_fields=32)
        except (StarletteHTTPException, ClientDisconnect):
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
            raise ServiceError(400, "invalid multipart body", f"could not parse the form ({plain_message(e)}); send "
                               "multipart/form-data with the image in a file field") from None  # fmt: skip
        inputs = []
        try:
            for _, upload in form.multi_items():
                if not hasattr(upload, "read"):
                    continue
                utype = (upload.content_type or "application/octet-stream").split(";")[0].lower()
                if utype not in limits.content_types and utype != "application/octet-stream":
                    raise ServiceError(415, "unsupported media type",
                                       f"file {upload.filename!r} is {utype}; expected one of "
                                       f"{', '.join(limits.content_types)}")  # fmt: skip
                inputs.append(Input(await upload.read(), upload.filename or "file"))
        finally:
            await form.close()
        if not inputs:
            raise ServiceError(422, "no image", "the form has no file; send the image as a file field, e.g. "
                               "`curl -F file=@digit.png ...`")  # fmt: skip
        return None, inputs
    if ctype in limits.content_types:
        if not single:
            raise ServiceError(415, "unsupported media type",
                               "a batch is sent as JSON {\"images\": [...]} or as multipart files")
        return await request.body(), None
    allowed = ["application/json", "multipart/form-data"] + (limits.content_types if single else [])
    raise ServiceError(415, "unsupported media type",
                       f"Content-Type {ctype or '(none)'!r}; expected one of {', '.join(allowed)}")


def _parse(raw: bytes | None, form_inputs: list[Input] | None, headers: Any, model: type[BaseModel], limits: Any,
           single: bool) -> tuple[Any, list[Input]]:  # fmt: skip
    """The request's body model (defaults for non-JSON bodies) and its images, or a 4xx ServiceError. CPU work on
    client data: runs in the worker pool, never on the event loop."""
    if form_inputs is not None:
        return model.model_construct(**_defaults(model)), _check_count(form_inputs, limits, single)
    assert raw is not None
    if _content_type(headers) != "application/json":
        return model.model_construct(**_defaults(model)), [Input(raw, "body")]
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ServiceError(400, "invalid JSON", f"the body is not valid JSON ({plain_message(e)}); NaN and "
                           "Infinity are not accepted") from None  # fmt: skip
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise ServiceError(422, "invalid request", _validation_detail(e.errors())) from None
    if getattr(body, "pattern", None) is not None:
        from digitkit.realworld.pattern import compile_pattern

        try:
            compile_pattern(body.pattern)
        except DataError as e:
            raise ServiceError(422, "invalid pattern", str(e)) from None
    items = body.images if isinstance(body, schemas.BatchIn) else [body]
    return body, _check_count([_from_json(item, limits) for item in items], limits, single)


def _content_type(headers: Any) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()



def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    return {name: f.get_default(call_default_factory=True) for name, f in model.model_fields.items()
            if not f.is_required()}  # fmt: skip


def _check_count(inputs: list[Input], limits: Any, single: bool) -> list[Input]:
    if single and len(inputs) != 1:
        raise ServiceError(422, "one image expected", f"got {len(inputs)} images; send several to /v1/predict/batch")
    if not inputs:
        raise ServiceError(422, "no image", "the batch is empty; send at least one image")
    if len(inputs) > limits.max_batch:
        raise ServiceError(413, "batch too large",
                           f"{len(inputs)} images; at most {limits.max_batch} per request (limits.max_batch): "
                           "split the batch")  # fmt: skip
    return inputs


def _from_json(item: schemas.ImageIn, limits: Any) -> Input:
    if (item.image is None) == (item.pixels is None):
        raise ServiceError(422, "invalid request", "give exactly one of `image` (base64 file) or `pixels` (rows)")
    if item.model_input and item.pixels is None:
        raise ServiceError(422, "invalid request", "`model_input` applies to `pixels` only; files are always "
                           "preprocessed")  # fmt: skip
    if item.image is not None:
        text = item.image
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ServiceError(422, "invalid base64", f"`image` is not valid base64 ({e}); send the file's bytes "
                               "base64-encoded, e.g. `base64 -w0 digit.png`") from None  # fmt: skip
        return Input(raw, "image")
    rows = item.pixels
    side = limits.max_pixels_side
    if not rows or not rows[0] or len(rows) > side or any(len(r) != len(rows[0]) for r in rows) or len(rows[0]) > side:
        shape = f"{len(rows)} rows" + (f" of {sorted({len(r) for r in rows})} values" if rows else "")
        raise ServiceError(422, "invalid pixels",
                           f"`pixels` is {shape}; expected a rectangle of 1 to {side} rows of equal length "
                           "(e.g. 28 rows of 28 numbers)")  # fmt: skip
    a = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
        raise ServiceError(422, "invalid pixels", "`pixels` values must be finite numbers in 0-255 (or 0-1)")
    return Input(a.astype(np.float32), "pixels", model_input=item.model_input)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _validation_detail(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first MAX_ERRORS_SHOWN validation errors (location, message, type: never the offending input itself),
    and how many more there were."""
    shown = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
             for e in errors[:MAX_ERRORS_SHOWN]]  # fmt: skip
    if len(errors) > MAX_ERRORS_SHOWN:
        shown.append({"loc": [], "msg": f"and {len(errors) - MAX_ERRORS_SHOWN:,} more errors like these",
                      "type": "truncated"})  # fmt: skip
    return shown


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {"Retry-After": "1"} if exc.status == 503 \
            else None
        return error_response(exc.status, exc.error, exc.detail, headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is listening: nothing to log, and RequestMetrics counts it as a disconnect, not as an error.
        request.scope["digitkit.disconnected"] = True
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request", _validation_detail(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase.lower()
        except ValueError:
            phrase = "error"
        return error_response(exc.status_code, getattr(exc, "error", phrase), exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", "digitkit failed on this request; it is logged on the server")

