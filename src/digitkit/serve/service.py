"""What the server does, without HTTP: inputs in, answers out, every answer cached, audited and monitored.

The routes in app.py only parse requests into `Input`s and turn `ServiceError`s into 4xx responses; everything
else lives here so it can be used and tested in-process. Images go through the one `Recognizer` (the same
preprocess, model and rejection rules as `digitkit predict`), so an image gets the same answer from the CLI,
the API and the drawing page. A row reader (settings.reader), when configured, answers /v1/read in its place: it
is loaded, reloaded and audited together with the model.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from digitkit.classify import Answer, Recognizer
from digitkit.errors import ConfigError, DataError, DigitkitError
from digitkit.preprocess import Preprocessed, preprocess_many
from digitkit.serve.audit import AuditLog, AuditRecord
from digitkit.serve.drift import Baseline, DriftMonitor, compute_baseline, load_baseline, save_baseline
from digitkit.serve.metrics import Metrics
from digitkit.serve.settings import ServeSettings

log = logging.getLogger("digitkit.serve")

BASELINE_IMAGES = 2000
"""Validation images answered to build a missing drift baseline (about 1 s on 2 cores)."""
LATENCY_PROBES = 30


class ServiceError(DigitkitError):
    """A request the service cannot answer: `status` is the HTTP status (always 4xx), `error` a short title."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class Input:
    """One image as received: encoded bytes (PNG, JPEG, ...) or a pixel array (H, W) of numbers."""

    data: bytes | np.ndarray
    name: str = "image"
    model_input: bool = False
    """Pixels already in the model's input format: preprocessing is skipped (see schemas.ImageIn)."""

    def sha256(self) -> str:
        if isinstance(self.data, np.ndarray):
            a = np.ascontiguousarray(self.data, dtype=np.float64)
            kind = "model-input" if self.model_input else "pixels"
            return hashlib.sha256(f"{kind}{a.shape}".encode() + a.tobytes()).hexdigest()
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Job:
    """One request's images and how to answer them (Service.predict_jobs answers several jobs at once)."""

    inputs: list[Input]
    route: str
    client: str
    top_k: int = 3
    return_input: bool = False
    strict: bool = False
    """One image per request: an unusable image is the job's ServiceError, not an `unreadable` answer."""


@dataclass
class ModelInfo:
    name: str
    version: str
    checkpoint: str
    checkpoint_sha256: str
    classes: list[str]
    metrics: dict[str, Any]
    contract: dict[str, Any]
    config: dict[str, Any]


@dataclass
class ReaderInfo:
    """Which reader answers /v1/read: `segment` (the model's digits, cut out of the row) or `sequence` (a row
    reader, settings.reader)."""

    kind: str
    name: str
    version: str
    """What /v1/read answers carry as model_version: the reader's run name and checkpoint hash when it answers."""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    contract: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The fields that have a value: all of them for a row reader; kind, name and version for the segmenting
        reader (its checkpoint, metrics and contract are the model's, beside it in /v1/model)."""
        return {k: v for k, v in self.__dict__.items() if v or k in ("kind", "name", "version")}


class AnswerCache:
    """Bounded LRU of answers by (model version, input hash). It stores the whole answer, so a hit returns
    exactly what computing would (predictions are deterministic: the noise defence uses fixed noise)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[str, str], value: dict[str, Any]) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Loaded:
    """A model with everything that belongs to it: replaced as a whole on reload."""

    def __init__(self, path: str, settings: ServeSettings) -> None:
        from digitkit import runs
        from digitkit.calibration import temperature_of

        opened = runs.open_model(path)
        if opened.ckpt.get("task") == "sequence":
            raise ConfigError(_model_is_a_reader(path))
        # The reader first: a wrong one fails in a second, before the drift baseline takes its time.
        reader, reader_info = _open_reader(settings.reader, settings) if settings.reader else (None, None)
        self.reader: Any = reader  # a SequenceReader, or None: /v1/read cuts the row into digits for the recognizer
        sha = runs.checkpoint_sha256(opened.checkpoint_path)
        if settings.engine == "onnx":  # the run's export of this very checkpoint; the torch model stays for explain
            from digitkit.engine import open_recognizer

            self.recognizer = open_recognizer(opened.run_dir or opened.checkpoint_path.parent, settings.threads,
                                              opened.model, expect_checkpoint_sha256=sha)  # fmt: skip
        else:
            self.recognizer = Recognizer(opened.model, opened.ckpt["classes"], opened.cfg.inference,
                                         opened.cfg.preprocess, temperature=temperature_of(opened.ckpt))  # fmt: skip
        name = opened.run_dir.name if opened.run_dir else opened.checkpoint_path.stem
        engine_tag = "-onnx" if settings.engine == "onnx" else ""
        summary = _read_json(opened.run_dir / "summary.json") if opened.run_dir else {}
        pre = opened.cfg.preprocess
        self.info = ModelInfo(
            name=name, version=f"{name}-{sha[:12]}{engine_tag}", checkpoint=str(opened.checkpoint_path),
            checkpoint_sha256=sha,
            classes=list(opened.ckpt["classes"]),
            metrics={k: summary[k] for k in ("test_accuracy", "val_accuracy", "params", "epochs", "best_epoch",
                                             "macs_per_image") if k in summary},
            contract={
                "input": "any image (PNG, JPEG, BMP, TIFF, WebP, GIF) or a pixel array; digitkit.preprocess makes "
                         "it MNIST-like",
                "model_input_shape": [1, 1, pre.size, pre.size],
                "model_input": "white digit on black, float in [0, 1], centred by mass in a 20x20 box",
                "preprocess": pre.__dict__.copy(),
                "inference": opened.cfg.inference.__dict__.copy(),
                "temperature": temperature_of(opened.ckpt),  # confidence = softmax(logits / temperature)
                "engine": settings.engine,
                **({"onnx_file": str(self.recognizer.engine.path)} if settings.engine == "onnx" else {}),
            },
            config=opened.ckpt.get("config") or {},
        )  # fmt: skip
        self.model_dir = opened.run_dir or opened.checkpoint_path.parent
        self.reader_info = reader_info or ReaderInfo("segment", name, self.info.version)
        self.baseline = self._baseline(opened, sha)
        self.drift = DriftMonitor(self.baseline, settings.drift)

    def _baseline(self, opened: Any, sha: str) -> Baseline:
        stored = load_baseline(self.model_dir, sha)
        if stored is not None:
            return stored
        baseline = _reference_baseline(opened, self.recognizer)
        save_baseline(baseline, self.model_dir, sha)  # a fallback is never stored (save_baseline refuses it)
        return baseline


def check_paths(settings: ServeSettings) -> None:
    """Before the server starts (`digitkit serve`): `model` is a single-digit classifier and `reader`, when set, a row
    reader, so that a wrong path is one clear line, not a traceback from inside uvicorn's startup."""
    from digitkit import checkpoint
    from digitkit.engine import onnx_path

    if checkpoint.load(settings.model).get("task") == "sequence":
        raise ConfigError(_model_is_a_reader(settings.model))
    if settings.engine == "onnx":
        onnx_path(settings.model)  # the export is there (whether it is of this checkpoint is checked at load)
    if settings.reader:
        try:
            ckpt = checkpoint.load(settings.reader)
        except DigitkitError as e:
            raise ConfigError(f"reader: {e}; expected the run folder or checkpoint of a row reader") from None
        _check_reader(settings.reader, ckpt)
        if settings.engine == "onnx":
            try:
                onnx_path(settings.reader)
            except DigitkitError as e:
                raise ConfigError(f"reader: {e}") from None


def _model_is_a_reader(path: str) -> str:
    return (f"model {path}: a row reader (task: sequence), not a single-digit classifier; serve it with "
            f"--reader {path} (setting reader:) beside a digit classifier as --model: the classifier answers "
            "/v1/predict and the drawing page, the row reader /v1/read")  # fmt: skip


def _check_reader(path: str, ckpt: dict[str, Any]) -> None:
    """A ConfigError unless `ckpt` is a row reader's, saying what it is instead and what was expected."""
    if ckpt.get("task") != "sequence":
        raise ConfigError(f"reader {path}: a single-digit classifier ({ckpt.get('model')}), not a row reader; reader "
                          "takes a run trained with task: sequence (`digitkit train --config configs/read.yaml`), or "
                          "leave it unset to read rows by cutting them into digits for the model")  # fmt: skip


def _open_reader(path: str, settings: ServeSettings) -> tuple[Any, ReaderInfo]:
    """The row reader at `path` (PyTorch, or its run's ONNX export with engine onnx) and what /v1/model says of it."""
    from digitkit import runs
    from digitkit.realworld.reader import BEAM_WIDTH, SequenceReader

    try:
        opened = runs.open_model(path)
    except DigitkitError as e:
        raise ConfigError(f"reader: {e}; expected the run folder or checkpoint of a row reader") from None
    _check_reader(path, opened.ckpt)
    sha = runs.checkpoint_sha256(opened.checkpoint_path)
    folder = opened.run_dir or opened.checkpoint_path.parent
    cfg = opened.cfg
    if settings.engine == "onnx":  # the export of this very checkpoint: open_reader refuses a stale one
        from digitkit.engine import open_reader

        try:
            reader = open_reader(folder, settings.threads, expect_checkpoint_sha256=sha)
        except DigitkitError as e:
            raise ConfigError(f"reader: {e}") from None
    else:
        reader = SequenceReader(opened.model, cfg.rows, cfg.preprocess, cfg.inference)
    name = opened.run_dir.name if opened.run_dir else opened.checkpoint_path.stem
    summary = _read_json(opened.run_dir / "summary.json") if opened.run_dir else {}
    info = ReaderInfo(
        kind="sequence", name=name, version=f"{name}-{sha[:12]}{'-onnx' if settings.engine == 'onnx' else ''}",
        checkpoint=str(opened.checkpoint_path), checkpoint_sha256=sha, model=str(opened.ckpt.get("model")),
        metrics={k: summary[k] for k in ("test_accuracy", "val_accuracy", "params", "epochs", "best_epoch",
                                         "validation", "test") if k in summary},
        contract={
            "input": "an image of one row of handwritten digits, any size and polarity; the string is read whole "
                     "(CTC), without cutting the row into digits",
            "rows": reader.rows_cfg.__dict__.copy(),
            "preprocess": reader.preprocess_cfg.__dict__.copy(),
            "inference": reader.inference.__dict__.copy(),
            "beam_width": BEAM_WIDTH,
            "engine": settings.engine,
            **({"onnx_file": str(reader.engine.path)} if settings.engine == "onnx" else {}),
        },
    )  # fmt: skip
    return reader, info


def _reference_baseline(opened: Any, recognizer: Recognizer) -> Baseline:
    """Answers on (part of) the model's validation split; a uniform prior when the data is not at hand."""
    from digitkit import data, runs
    from digitkit.serve.drift import uniform_baseline

    cfg = opened.cfg
    try:
        full = data.load_split(cfg.data.dir, "train", verify=False)
    except DigitkitError as e:
        log.warning("no reference data for the drift baseline (%s); drift is measured against a uniform fallback "
                    "until the server starts (or reloads) with the data at %s; the fallback is not stored",
                    e, cfg.data.dir)  # fmt: skip
        return uniform_baseline(recognizer.classes)
    train_idx, val_idx = data.stratified_split(full.labels, cfg.data.val_fraction, cfg.split_seed)
    what = "validation images"
    if not len(val_idx):  # data.val_fraction 0: a seeded sample of the training images, all of which it trained on
        val_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.split_seed))]
        what = "training images (the model has no validation hold-out, so its confidence there runs high)"
    val = runs.prepared(full.subset(val_idx[:BASELINE_IMAGES]), cfg)
    pres = [Preprocessed(x.float().div(255)) for x in val.images]
    answers = recognizer.answers(pres)
    return compute_baseline(answers, recognizer.classes, f"{len(val)} {what} of {cfg.data.dir}")


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Service:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.threads)
        self.metrics = Metrics()
        self.cache = AnswerCache(settings.cache_size)
        self.loaded = Loaded(settings.model, settings)
        self.audit = AuditLog(settings.audit_url(self.loaded.model_dir))
        self._reload_lock = threading.Lock()
        self.started = time.time()
        self.loaded.baseline.latency_ms = self._measure_latency()
        self.pruner = self.audit.start_pruner(settings.audit)  # audit retention, in a background thread

    # ------------------------------------------------------------------------------------------ model
    @property
    def info(self) -> ModelInfo:
        return self.loaded.info

    def reload(self, path: str | None = None) -> ModelInfo:
        """Load a model (the same path again by default) and swap it in; on any error the old one keeps serving."""
        return self.reload_loaded(path).info

    def reload_loaded(self, path: str | None = None) -> Loaded:
        """`reload`, giving everything loaded: the model and the row reader (settings.reader, from its path again:
        a reload with another model keeps the configured reader), swapped in together."""
        with self._reload_lock:
            try:
                fresh = Loaded(path or self.settings.model, self.settings)
            except DigitkitError as e:
                raise ServiceError(422, "model not loaded", f"{e}; the previous model keeps serving") from None
            fresh.baseline.latency_ms = self.loaded.baseline.latency_ms
            self.loaded = fresh
            self.cache.clear()
            if path:
                self.settings.model = path
            log.info("serving %s, rows read by %s", fresh.info.version, fresh.reader_info.version)
            return fresh

    def _measure_latency(self) -> float:
        """Median time to answer one image end to end (the drift monitor's latency baseline): a 280x280 PNG of a
        stroke, what the drawing page sends; a 28x28 pixel array takes about a third of that."""
        rng = np.random.default_rng(0)
        probe = np.full((280, 280), 255.0)
        probe[60:220, 125:155] = 0.0
        times = []
        for _ in range(LATENCY_PROBES):
            noisy = np.clip(probe + rng.uniform(-2, 2, probe.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy).save(buf, format="PNG")
            t0 = time.perf_counter()
            self._compute(Input(buf.getvalue()))
            times.append((time.perf_counter() - t0) * 1000)
        return float(np.median(times))

    # ------------------------------------------------------------------------------------------ answers
    def predict(self, inputs: list[Input], route: str, client: str, top_k: int = 3, return_input: bool = False,
                strict: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """One answer dict per input, in order; every one is in the audit log before this returns.

        An input that is not a readable image gets `rejected: "unreadable"` and an `error`; with `strict` (one
        image per request) it raises ServiceError instead, after the attempt is logged.
        """
        return self._predict(inputs, route, client, top_k, return_input, strict)[0]

    def predict_jobs(self, jobs: list[Job]) -> list[list[dict[str, Any]] | ServiceError]:
        """Several requests answered together (micro-batching, digitkit.serve.app): every image of every job not in
        the cache goes through the recognizer in one batch, and all their audit records are committed in one
        transaction before this returns. Each job gets its own answers, or its own ServiceError (a strict job whose
        image is unusable): one request's bad input never changes another's answer."""
        return [out if isinstance(out, ServiceError) else out[0] for out in self._predict_jobs(jobs)]

    def _predict_jobs(self, jobs: list[Job]) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]] | ServiceError]:
        loaded = self.loaded  # one model for the whole batch, even if a reload happens meanwhile
        version = loaded.info.version
        items = [item for job in jobs for item in job.inputs]
        found, latencies = self._answer_all(items, loaded)
        outs: list[tuple[list[dict[str, Any]], list[dict[str, Any]]] | ServiceError] = []
        records, observed, now = [], [], time.time()
        k = 0
        for job in jobs:
            results, entries = [], []
            for _ in job.inputs:
                (entry, hit, sha), latency_ms = found[k], latencies[k]
                k += 1
                answer = {**entry["answer"], "top_k": entry["answer"]["top_k"][:job.top_k]}
                request_id = uuid.uuid4().hex
                out = {"request_id": request_id, "model_version": version, **answer, "latency_ms": latency_ms,
                       "cached": hit}  # fmt: skip
                if job.return_input:
                    out["input_png"] = png_base64(entry["image"]) if entry["image"] is not None else None
                results.append(out)
                entries.append(entry)
                records.append(AuditRecord(
                    request_id=request_id, time=now, route=job.route, input_sha256=sha, model_version=version,
                    digit=answer["digit"], confidence=answer["confidence"], rejected=answer["rejected"],
                    latency_ms=latency_ms, client=job.client, cached=hit,
                    image=entry["image"].tobytes() if entry["image"] is not None else None,
                ))  # fmt: skip
                observed.append((out, job.route))
            if job.strict and len(entries) == 1 and entries[0]["status"]:
                outs.append(ServiceError(entries[0]["status"], entries[0]["title"], results[0]["error"]))
            else:
                outs.append((results, entries))
        self.audit.record(records)  # durable before anyone is told an answer: one transaction for the batch
        for out, route in observed:
            self.metrics.observe_answer(out["digit"], out["confidence"], out["rejected"], out["cached"])
            if route != "preview":  # a cache hit's latency says nothing about the model's: left out
                loaded.drift.observe(out["digit"], out["confidence"], None if out["cached"] else out["latency_ms"])
        return outs

    def _predict(self, inputs: list[Input], route: str, client: str, top_k: int, return_input: bool,
                 strict: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
        out = self._predict_jobs([Job(inputs, route, client, top_k, return_input, strict)])[0]
        if isinstance(out, ServiceError):
            raise out
        return out

    def _answer_all(self, items: list[Input], loaded: Loaded) -> tuple[list[tuple[dict[str, Any], bool, str]],
                                                                       list[float]]:  # fmt: skip
        """Per item (cache entry {answer, image, status, title}, whether it came from the cache, input hash), and
        its latency in ms: a computed image's share of the time the batch took (so that the drift and alert latency
        windows measure the model's cost per image, whatever the batching), a cache hit's own lookup time."""
        t0 = time.perf_counter()
        version = loaded.info.version
        found: list[tuple[dict[str, Any], bool, str] | None] = []
        misses: dict[tuple[str, str], list[int]] = {}  # the same input twice in a batch is computed once
        for i, item in enumerate(items):
            sha = item.sha256()
            entry = self.cache.get((version, sha))
            found.append((entry, True, sha) if entry is not None else None)
            if entry is None:
                misses.setdefault((version, sha), []).append(i)
        hit_ms = round((time.perf_counter() - t0) * 1000 / max(len(items), 1), 3)
        latencies = [hit_ms] * len(items)
        if misses:
            t1 = time.perf_counter()
            computed = self._compute_all([items[where[0]] for where in misses.values()], loaded)
            share = round((time.perf_counter() - t1) * 1000 / len(misses), 3) + hit_ms
            for (key, where), (answer, image, status, title) in zip(misses.items(), computed, strict=True):
                entry = {"answer": answer, "image": image, "status": status, "title": title}
                self.cache.put(key, entry)
                for i in where:
                    found[i], latencies[i] = (entry, False, key[1]), share
        return found, latencies  # type: ignore[return-value]

    def _compute(self, item: Input, loaded: Loaded | None = None) -> tuple[dict[str, Any], np.ndarray | None, int,
                                                                           str]:  # fmt: skip
        """(answer, the uint8 model input or None, and for an unusable input the 4xx status and title, else 0)."""
        return self._compute_all([item], loaded or self.loaded)[0]

    def _compute_all(self, items: list[Input], loaded: Loaded) -> list[tuple[dict[str, Any], np.ndarray | None, int,
                                                                            str]]:  # fmt: skip
        """`_compute` for several items: each preprocessed on its own (images already in MNIST's format take the
        fast path), then every readable one through the model and the rejection rules in one batch."""
        rec = loaded.recognizer
        pres: list[Preprocessed | None] = [None] * len(items)
        failed: dict[int, tuple[Answer, int, str]] = {}
        images: list[int] = []  # items to preprocess, all together
        for i, item in enumerate(items):
            try:
                if item.model_input:
                    pres[i] = self._model_input(item.data, rec)
                    continue
                if isinstance(item.data, bytes):
                    self._check_encoded(item.data)
                images.append(i)
            except ServiceError as e:
                failed[i] = (Answer(None, 0.0, [], "unreadable", error=e.detail), e.status, e.error)
        for i, result in zip(images, preprocess_many([items[i].data for i in images], rec.preprocess_cfg),
                             strict=True):  # fmt: skip
            if isinstance(result, DataError):
                failed[i] = (Answer(None, 0.0, [], "unreadable", error=str(result)), 422, "unreadable image")
            else:
                pres[i] = result
        answers = rec.answers([p for p in pres if p is not None], top_k=len(rec.classes))
        seen = [a.x for a in answers if a.x is not None]  # the model inputs as uint8, converted all at once
        as_uint8 = iter(torch.stack(seen)[:, 0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy() if seen else [])
        computed = iter(answers)
        out = []
        for i, pre in enumerate(pres):
            answer, status, title = failed[i] if pre is None else (next(computed), 0, "")
            out.append((_answer_json(answer), next(as_uint8) if answer.x is not None else None, status, title))
        return out

    @staticmethod
    def _model_input(pixels: np.ndarray, rec: Recognizer) -> Preprocessed:
        size = rec.preprocess_cfg.size
        if pixels.shape != (size, size):
            raise ServiceError(422, "invalid pixels", f"model_input pixels are {pixels.shape[0]}x{pixels.shape[1]}; "
                               f"the model takes {size}x{size}: send them without model_input to be preprocessed")
        x = torch.from_numpy(pixels / 255 if pixels.max() > 1 else pixels).float()[None]
        return Preprocessed(x, None, {"input": {"source": "model input", "width": size, "height": size}})

    def _check_encoded(self, raw: bytes) -> None:
        """The pixel cap, read from the header before anything is decoded (decompression bombs)."""
        limit = self.settings.limits.max_image_pixels
        too_large = (f"over this server's limit of {limit:,} pixels (limits.max_image_pixels); shrink it (a digit "
                     "needs far fewer pixels)")
        if raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR" and len(raw) >= 24:
            # A PNG's size is the first chunk's first 8 bytes (what PIL reads too): no need to open the file twice.
            w, h = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
            if w * h > limit:
                raise ServiceError(413, "image too large", f"image is {w}x{h} = {w * h:,} pixels, {too_large}")
            return
        try:
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
        except Image.DecompressionBombError as e:  # PIL's own limit, far above ours: the same verdict
            raise ServiceError(413, "image too large", f"image is too large ({e}); {too_large}") from None
        except Exception:  # noqa: BLE001 - not an image: preprocess says what is wrong in its own words
            return
        if w * h > limit:
            raise ServiceError(413, "image too large", f"image is {w}x{h} = {w * h:,} pixels, {too_large}")

    def read(self, item: Input, client: str, pattern: str | None = None) -> dict[str, Any]:
        """A row of digits -> the string, per digit a box and a confidence, and the pattern check; audited (route
        read). The row reader answers when one is configured, else the model reads the digits cut out of the row."""
        t0 = time.perf_counter()
        if isinstance(item.data, bytes):
            self._check_encoded(item.data)
        loaded = self.loaded  # one model and reader for the whole request, even if a reload happens meanwhile
        if loaded.reader is not None:
            return self._read_row(item, client, pattern, loaded, t0)
        try:
            result = loaded.recognizer.read(item.data, pattern=pattern)
        except DataError as e:
            raise ServiceError(422, "unreadable image", str(e)) from None
        latency_ms = (time.perf_counter() - t0) * 1000
        request_id = uuid.uuid4().hex
        result.pop("record", None)
        self.audit.record([AuditRecord(
            request_id=request_id, time=time.time(), route="read", input_sha256=item.sha256(),
            model_version=loaded.info.version, digit=result["text"] or None, confidence=result["mean_confidence"],
            rejected=None if result["complete"] else "incomplete", latency_ms=round(latency_ms, 3), client=client,
        )])  # fmt: skip
        return {"request_id": request_id, "model_version": loaded.info.version, "reader": "segment", **result,
                "latency_ms": round(latency_ms, 3)}  # fmt: skip

    def _read_row(self, item: Input, client: str, pattern: str | None, loaded: Loaded, t0: float) -> dict[str, Any]:
        from digitkit.realworld.pattern import PatternError

        if item.model_input:
            raise ServiceError(422, "invalid request", "`model_input` pixels are the digit classifier's 28x28 input; "
                               "this server reads rows with a row reader, which takes the row as an image: send the "
                               "pixels without model_input")  # fmt: skip
        version = loaded.reader_info.version
        try:
            reading = loaded.reader.read(item.data, pattern=pattern)
        except PatternError as e:  # the routes compile it first; this is for in-process callers
            raise ServiceError(422, "invalid pattern", str(e)) from None
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        request_id = uuid.uuid4().hex
        out = reading.to_json()
        out.pop("record", None)
        self.audit.record([AuditRecord(
            request_id=request_id, time=time.time(), route="read", input_sha256=item.sha256(), model_version=version,
            digit=reading.text or None, confidence=out["confidence"], rejected=reading.rejected,
            latency_ms=latency_ms, client=client,
        )])  # fmt: skip
        if reading.rejected == "unreadable":  # logged first, as /v1/predict logs an unreadable attempt
            raise ServiceError(422, "unreadable image", reading.why or "not an image")
        return {"request_id": request_id, "model_version": version, **out, "latency_ms": latency_ms}

    def explain(self, item: Input, client: str, methods: list[str]) -> dict[str, Any]:
        """The prediction (logged like /v1/predict) plus one heat-map overlay PNG per method."""
        from digitkit import explain

        t0 = time.perf_counter()
        loaded = self.loaded
        results, entries = self._predict([item], "explain", client, 3, True, strict=True)
        answer, image = results[0], entries[0]["image"]
        x = torch.from_numpy(image.astype(np.float32) / 255)[None, None]
        target = torch.tensor([loaded.info.classes.index(answer["predicted"])]) if answer.get("predicted") else None
        overlays: dict[str, str] = {}
        errors: dict[str, str] = {}
        for method in methods:
            try:
                maps, _ = explain.attribute(loaded.recognizer.model, x, method, target, model_name=loaded.info.name)
            except DigitkitError as e:
                errors[method] = str(e)
                continue
            overlays[method] = png_base64(explain.overlay(x[0, 0].numpy(), maps[0].numpy()))
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)  # the explanations included
        return {**answer, "latency_ms": latency_ms, "overlays": overlays, "overlay_errors": errors}

    def feedback(self, request_id: str, true_label: str) -> dict[str, Any]:
        if true_label not in self.info.classes:
            raise ServiceError(422, "unknown label",
                               f"true_label {true_label!r} is not one of this model's classes "
                               f"({', '.join(self.info.classes)})")  # fmt: skip
        rec = self.audit.feedback(request_id, true_label)
        if rec is None:
            raise ServiceError(404, "unknown request id",
                               f"no prediction with request_id {request_id!r} in the audit log; use the request_id "
                               "a /v1/predict response returned")  # fmt: skip
        self.metrics.feedback.inc()
        return {"request_id": request_id, "true_label": true_label, "predicted": rec.digit,
                "correct": rec.digit == true_label}  # fmt: skip

    def refresh_live_metrics(self) -> None:
        labelled, correct = self.audit.labelled_accuracy()
        loaded = self.loaded
        stats = loaded.drift.window_stats()
        self.metrics.set_live(
            digitkit_live_accuracy=correct / labelled if labelled else None,
            digitkit_labelled_predictions=labelled,
            digitkit_window_mean_confidence=stats["mean_confidence"] if stats["size"] else None,
            digitkit_window_rejection_rate=stats["rejection_rate"] if stats["size"] else None,
            digitkit_window_median_latency_seconds=stats["median_latency_ms"] / 1000 if stats["size"] else None,
            digitkit_model_loaded=1,
            digitkit_drift_baseline_measured=1 if loaded.baseline.measured else 0,
            drift_alert=dict(loaded.drift.alerts), drift_value=dict(loaded.drift.values),
            model_version=loaded.info.version,
        )  # fmt: skip

    def close(self) -> None:
        self.pruner.close()
        self.audit.close()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _answer_json(answer: Answer) -> dict[str, Any]:
    out = answer.to_json()
    out.pop("record", None)
    if out.get("error") is None:
        out.pop("error", None)
    return out


def png_base64(image: np.ndarray) -> str:
    """(H, W) uint8 gray or (H, W, 3) uint8 RGB -> base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
