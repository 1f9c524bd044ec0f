"""The REST API and the drawing page: thin routes over digitkit.serve.service.

`create_app(settings)` builds the app; the model is loaded in the lifespan (never at import). Every error a
client can cause is a 4xx with a JSON body {"error": ..., "detail": ...}; a 500 means a bug in digitkit.

Routes (all JSON unless said):
  POST /v1/predict         one image: multipart file, raw image body, or JSON {"image": base64} / {"pixels": rows}
  POST /v1/predict/batch   up to limits.max_batch images: multipart files or JSON {"images": [...]}
  POST /v1/read            a row of digits -> string
  POST /v1/explain         prediction + saliency / Grad-CAM overlays (base64 PNG)
  POST /v1/feedback        {request_id, true_label}
  GET  /v1/model, /healthz, /readyz, /metrics (Prometheus text)
  POST /v1/admin/reload, GET /v1/admin/audit/export, GET /v1/admin/audit/stats   (admin token)
  GET  /                   the drawing page (assets under /static, no CDN)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from digitkit import __version__
from digitkit.serve import schemas
from digitkit.serve.metrics import CONTENT_TYPE
from digitkit.serve.service import Input, Service, ServiceError
from digitkit.serve.settings import SETTINGS_ENV, ServeSettings

log = logging.getLogger("digitkit.serve")
T = TypeVar("T")
STATIC = resources.files("digitkit.serve") / "static"
IMAGE_FORMS = {
    "application/json": {"schema": {"$ref": "#/components/schemas/{model}"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format":
                            "binary"}}, "required": ["file"]}},  # fmt: skip
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
}
ERRORS = {code: {"model": schemas.ErrorOut} for code in (400, 401, 403, 404, 408, 413, 415, 422, 503)}


def _body_doc(model: type[BaseModel], multipart_files: bool = False) -> dict[str, Any]:
    """OpenAPI for a body that may come as JSON, multipart or a raw image (parsed by hand in `_inputs`)."""
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
class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, by Content-Length or while they stream in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_error(send, 413, "request too large", self._detail(declared.decode(errors="replace")))
        seen, started = 0, False

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "request too large", self._detail(f"more than {seen}"))

    def _detail(self, size: str) -> str:
        return (f"the request body is {size} bytes; this server accepts at most {self.limit:,} "
                "(limits.max_request_bytes); send a smaller image or fewer images per batch")  # fmt: skip


class _TooLarge(Exception):
    pass


class RequestMetrics:
    """Requests by route and status, and latency, for /metrics (pure ASGI: cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        t0, status = loop.time(), [500]

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            service = getattr(self.state, "service", None)
            if service is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                service.metrics.requests.labels(route, str(status[0])).inc()
                service.metrics.latency.labels(route).observe(loop.time() - t0)


async def _send_error(send: Callable, status: int, error: str, detail: Any) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app
def create_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        app.state.service = await run_in_threadpool(Service, settings)
        log.info("serving %s on %d torch thread(s)", app.state.service.info.version, settings.threads)
        try:
            yield
        finally:
            service, app.state.service = app.state.service, None
            service.close()

    app = FastAPI(title="digitkit", version=__version__, lifespan=lifespan,
                  description="Handwritten-digit recognition: predict, read, explain, feedback.")  # fmt: skip
    app.state.service = None
    app.add_middleware(RequestMetrics, state=app.state)
    app.add_middleware(BodyLimit, limit=settings.limits.max_request_bytes)
    _add_error_handlers(app)
    _publish_body_models(app, (schemas.PredictIn, schemas.BatchIn, schemas.ReadIn, schemas.ExplainIn))
    limits = settings.limits

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

    async def work(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.wait_for(run_in_threadpool(fn, *args, **kwargs), limits.request_timeout_s)
        except TimeoutError:
            raise ServiceError(408, "request timeout",
                               f"the request took longer than {limits.request_timeout_s:g} s "
                               "(limits.request_timeout_s); send a smaller image or batch") from None

    # ----------------------------------------------------------------------------------- prediction
    @app.post("/v1/predict", response_model=schemas.Prediction, responses=ERRORS, dependencies=[Depends(api_key)],
              openapi_extra=_body_doc(schemas.PredictIn), tags=["predict"])  # fmt: skip
    async def predict(request: Request) -> Response:
        """Predict one digit. Send a multipart `file`, a raw image body, or JSON with `image` or `pixels`."""
        body, inputs = await _inputs(request, schemas.PredictIn, limits, single=True)
        svc = service()
        route = "preview" if body.preview else "predict"
        args = (inputs, route, _client(request), body.top_k, body.return_input)
        if svc.is_small(inputs[0]):
            # A small image is answered on the event loop: handing it to a worker thread and back costs more than
            # the answer (about 5 ms against 1-2 ms on 2 busy cores, benchmarks/serve_load.py), and work this
            # small cannot overrun the request timeout.
            result = svc.predict(*args, strict=True)
        else:
            result = await work(svc.predict, *args, strict=True)
        return JSONResponse(result[0])

    @app.post("/v1/predict/batch", response_model=schemas.BatchOut, responses=ERRORS,
              dependencies=[Depends(api_key)], openapi_extra=_body_doc(schemas.BatchIn, multipart_files=True),
              tags=["predict"])  # fmt: skip
    async def predict_batch(request: Request) -> Response:
        """Predict up to `max_batch` images, answered in order; an unreadable one gets `rejected: unreadable`."""
        body, inputs = await _inputs(request, schemas.BatchIn, limits, single=False)
        svc = service()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await work(svc.predict, inputs, "batch", _client(request), body.top_k, body.return_input)
        return JSONResponse({"results": results, "count": len(results),
                             "latency_ms": round((loop.time() - t0) * 1000, 3)})  # fmt: skip

    @app.post("/v1/read", response_model=schemas.ReadOut, responses=ERRORS, dependencies=[Depends(api_key)],
              openapi_extra=_body_doc(schemas.ReadIn), tags=["predict"])  # fmt: skip
    async def read(request: Request) -> Response:
        """Read a row of handwritten digits (an amount, a postcode) as a string, with one result per digit."""
        body, inputs = await _inputs(request, schemas.ReadIn, limits, single=True)
        svc = service()
        return JSONResponse(await work(svc.read, inputs[0], _client(request), body.pattern))

    @app.post("/v1/explain", response_model=schemas.ExplainOut, responses=ERRORS, dependencies=[Depends(api_key)],
              openapi_extra=_body_doc(schemas.ExplainIn), tags=["predict"])  # fmt: skip
    async def explain(request: Request) -> Response:
        """The prediction plus heat maps of the pixels that drove it (saliency, Grad-CAM, ...)."""
        body, inputs = await _inputs(request, schemas.ExplainIn, limits, single=True)
        svc = service()
        return JSONResponse(await work(svc.explain, inputs[0], _client(request), list(dict.fromkeys(body.methods))))

    @app.post("/v1/feedback", response_model=schemas.FeedbackOut, responses=ERRORS,
              dependencies=[Depends(api_key)], tags=["predict"])  # fmt: skip
    async def feedback(body: schemas.FeedbackIn) -> Response:
        """Tell the server the true label of an earlier prediction; feeds live accuracy and retraining data."""
        svc = service()
        return JSONResponse(await work(svc.feedback, body.request_id, body.true_label))

    # ----------------------------------------------------------------------------------- information
    @app.get("/v1/model", response_model=schemas.ModelOut, responses=ERRORS, tags=["info"])
    async def model() -> Response:
        """Name, version, checkpoint hash, metrics, and the preprocessing contract."""
        svc = service()
        info = svc.info
        out = {k: v for k, v in info.__dict__.items() if k != "config"}
        out["drift_baseline"] = {**svc.loaded.baseline.to_json(), "latency_ms": svc.loaded.baseline.latency_ms}
        return JSONResponse(out)

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
        await run_in_threadpool(svc.refresh_live_metrics)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE)

    # ----------------------------------------------------------------------------------- admin
    @app.post("/v1/admin/reload", response_model=schemas.ModelOut, responses=ERRORS,
              dependencies=[Depends(admin)], tags=["admin"])  # fmt: skip
    async def reload(body: schemas.ReloadIn | None = None) -> Response:
        """Load the model again (or another one) and swap it in; the old one serves until the new one is ready."""
        svc = service()
        info = await run_in_threadpool(svc.reload, body.model if body else None)
        return JSONResponse({k: v for k, v in info.__dict__.items() if k != "config"})

    @app.get("/v1/admin/audit/stats", responses=ERRORS, dependencies=[Depends(admin)], tags=["admin"])
    async def audit_stats() -> Response:
        """Totals, rejection rate, latency percentiles and labelled accuracy from the audit log."""
        svc = service()
        return JSONResponse(await run_in_threadpool(svc.audit.stats))

    @app.get("/v1/admin/audit/export", responses=ERRORS, dependencies=[Depends(admin)], tags=["admin"])
    async def audit_export(format: str = "jsonl", labelled: bool = False) -> Response:  # noqa: A002 - the query name
        """The audit log as CSV or JSON lines (streamed)."""
        if format not in ("csv", "jsonl"):
            raise ServiceError(422, "unknown format", f"format={format!r}; expected csv or jsonl")
        svc = service()
        spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        await run_in_threadpool(svc.audit.export, spool, format, labelled)
        spool.seek(0)
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(_drain(spool), media_type=media)

    # ----------------------------------------------------------------------------------- the page
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


def app_from_env() -> FastAPI:
    """The factory uvicorn's workers call (`digitkit serve --workers N`)."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start the server with `digitkit serve`")
    from digitkit.serve.settings import from_dict

    return create_app(from_dict(json.loads(raw)))


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
async def _inputs(request: Request, model: type[BaseModel], limits: Any, single: bool) -> tuple[Any, list[Input]]:
    """The request's body model (defaults for non-JSON bodies) and its images, or a 4xx ServiceError."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise ServiceError(400, "invalid JSON", f"the body is not valid JSON ({e}); NaN and Infinity are not "
                               "accepted") from None  # fmt: skip
        try:
            body = model.model_validate(data)
        except ValidationError as e:
            raise ServiceError(422, "invalid request", _validation_detail(e.errors())) from None
        items = body.images if isinstance(body, schemas.BatchIn) else [body]
        return body, _check_count([_from_json(item, limits) for item in items], limits, single)
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_batch + 1, max_fields=32)
        except Exception as e:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
            raise ServiceError(400, "invalid multipart body", f"could not parse the form ({e})") from None
        files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
        inputs = []
        for _, upload in files:
            utype = (upload.content_type or "application/octet-stream").split(";")[0].lower()
            if utype not in limits.content_types and utype != "application/octet-stream":
                raise ServiceError(415, "unsupported media type",
                                   f"file {upload.filename!r} is {utype}; expected one of "
                                   f"{', '.join(limits.content_types)}")  # fmt: skip
            inputs.append(Input(await upload.read(), upload.filename or "file"))
        await form.close()
        if not inputs:
            raise ServiceError(422, "no image", "the form has no file; send the image as a file field, e.g. "
                               "`curl -F file=@digit.png ...`")  # fmt: skip
        return model.model_construct(**_defaults(model)), _check_count(inputs, limits, single)
    if ctype in limits.content_types:
        if not single:
            raise ServiceError(415, "unsupported media type",
                               "a batch is sent as JSON {\"images\": [...]} or as multipart files")
        raw = await request.body()
        return model.model_construct(**_defaults(model)), [Input(raw, "body")]
    allowed = ["application/json", "multipart/form-data"] + (limits.content_types if single else [])
    raise ServiceError(415, "unsupported media type",
                       f"Content-Type {ctype or '(none)'!r}; expected one of {', '.join(allowed)}")


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
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.error, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request", _validation_detail(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase.lower()
        except ValueError:
            phrase = "error"
        return error_response(exc.status_code, phrase, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", "digitkit failed on this request; it is logged on the server")

