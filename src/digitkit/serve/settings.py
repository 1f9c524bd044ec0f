"""Serving settings: one typed object built from an optional YAML file plus command-line flags.

Secrets (the API key and the admin token) never come from the YAML or the command line, where they would end up
in shell history, `ps` output or a committed file: they come from the environment (DIGITKIT_API_KEY,
DIGITKIT_ADMIN_TOKEN) or from files named by --api-key-file / --admin-token-file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from digitkit.errors import ConfigError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "image/gif")
SETTINGS_ENV = "DIGITKIT_SERVE_SETTINGS"
"""Workers started by uvicorn (--workers N) read their settings as JSON from this variable."""


@dataclass
class LimitSettings:
    """What one request may ask for. Each violation is a 4xx with a JSON error, never a 500."""

    max_request_bytes: int = 8 * 2**20
    """Whole request body (8 MiB fits a 12 MP JPEG photo of a form)."""
    max_image_pixels: int = 40_000_000
    """Decoded size checked from the image header before decoding (decompression bombs)."""
    max_batch: int = 256
    """Images per /v1/predict/batch request."""
    max_pixels_side: int = 1024
    """Largest side of a JSON `pixels` array."""
    request_timeout_s: float = 30.0
    """Work on one request (after its body arrived) longer than this answers 408. The work itself is bounded by the
    other limits (pixels, frames, batch size, pattern size), so a thread left behind by a timeout ends soon."""
    content_types: list[str] = field(default_factory=lambda: list(IMAGE_TYPES))
    """Image types accepted as a raw body or a multipart file (JSON and multipart are always accepted)."""
    max_connections: int = 1000
    """Open connections per worker process; one more is answered 503 (Retry-After) and closed at once, before its
    request is read, so a flood of idle or half-sent connections cannot exhaust the process's file descriptors.
    Lowered at startup to fit the file-descriptor limit (`ulimit -n`) with room for the database and files."""
    max_connections_per_client: int = 256
    """Open connections per client address and worker, so that one client cannot take them all. Behind a reverse
    proxy every client has the proxy's address: set it to max_connections there and limit clients in the proxy."""
    backlog: int = 256
    """Connections the kernel queues before they are accepted; also the most the event loop accepts in one turn
    (256 take about 30 ms to accept or refuse), so a connection flood cannot hold the loop for long."""
    max_inflight: int = 64
    """Requests being answered at once per worker (bodies being read, queued or computing); beyond it 503 with
    Retry-After. /healthz, /readyz and /metrics are never refused by this limit."""
    max_inflight_per_client: int = 16
    """The same per client address, so that one client holding slow bodies cannot take every slot (behind a reverse
    proxy that buffers bodies, set it to max_inflight)."""
    worker_threads: int = 8
    """Threads per worker process that decode, preprocess, run the model and write the audit log: the event loop
    itself only moves bytes."""
    header_timeout_s: float = 10.0
    """A connection must send a request's whole header within this many seconds of its first byte (or of opening):
    slow-header clients (slowloris) are cut off with 408."""
    body_timeout_s: float = 30.0
    """A request's whole body must arrive within this many seconds of its header: slow-body clients are cut off
    with 408. (8 MiB in 30 s is 2.2 Mbit/s.)"""
    keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this many seconds."""
    max_header_bytes: int = 16384
    """A request line and header fields larger than this are answered 431 and the connection closed."""

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_pixels", "max_batch", "max_pixels_side", "max_connections",
                     "max_connections_per_client", "backlog", "max_inflight", "max_inflight_per_client",
                     "worker_threads", "max_header_bytes"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{name} = {value!r}: expected a positive integer")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise ConfigError(f"limits.{name} = {value!r}: expected seconds, more than 0 and at most 3600")


MAX_BATCH_WAIT_MS = 50.0


@dataclass
class BatchingSettings:
    """Micro-batching of single-image predictions (digitkit.serve.app.Batcher): requests that arrive together are
    answered by one forward pass and their audit records committed in one transaction; each still gets its own
    answer, and a bad input fails only its own request."""

    wait_ms: float = 2.0
    """How long a batch may wait for requests already on their way (their header read, their body still coming)
    before it runs; 0 turns micro-batching off (each request is its own forward pass and transaction). A request
    that arrives alone never waits: there is nobody on the way."""
    max_images: int = 64
    """Most requests in one micro-batch."""

    def __post_init__(self) -> None:
        wait = self.wait_ms
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not math.isfinite(wait) or \
                not 0 <= wait <= MAX_BATCH_WAIT_MS:  # fmt: skip
            raise ConfigError(f"batching.wait_ms = {wait!r}: expected milliseconds from 0 (micro-batching off) to "
                              f"{MAX_BATCH_WAIT_MS:g}, e.g. 2; every request may wait this long for others")
        top = self.max_images
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 1024:
            raise ConfigError(f"batching.max_images = {top!r}: expected a whole number of requests from 1 to 1024 "
                              "(e.g. 64; 1 turns micro-batching off)")


@dataclass
class DriftSettings:
    """Live traffic against the baseline stored with the model (see digitkit.serve.drift)."""

    window: int = 1000
    """Most recent predictions the rolling statistics cover."""
    min_samples: int = 200
    """No verdict before this many predictions are in the window."""
    check_every: int = 50
    """Predictions between two checks."""
    class_shift: float = 0.25
    """Alert when the total-variation distance between the window's predicted-class distribution and the
    baseline's exceeds this (0 = identical, 1 = disjoint)."""
    confidence_drop: float = 0.10
    """Alert when the window's mean confidence is this far below the baseline's."""
    rejection_rise: float = 0.15
    """Alert when the window's rejection rate is this far above the baseline's."""
    latency_ratio: float = 3.0
    """Alert when the window's median latency exceeds this many times the startup baseline."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_samples < 1 or self.check_every < 1:
            raise ConfigError("drift.window, drift.min_samples and drift.check_every must be positive integers")
        if self.min_samples > self.window:
            raise ConfigError(f"drift.min_samples = {self.min_samples} exceeds drift.window = {self.window}")
        if self.latency_ratio <= 1:
            raise ConfigError(f"drift.latency_ratio = {self.latency_ratio}: expected a ratio > 1")


MAX_WEBHOOK_URL = 2048
ALERT_WEBHOOK_ENV = "DIGITKIT_ALERT_WEBHOOK_URL"
"""A webhook URL often carries a token (Slack, Teams, PagerDuty): it may come from this variable instead of the file."""


@dataclass
class AlertSettings:
    """Alerts that act (see digitkit.serve.alerts): conditions judged over sliding windows, exported as gauges, shown
    at /v1/alerts and posted to `webhook_url` when they start or stop firing."""

    window: int = 1000
    """The last this many labels (from /v1/feedback) and the last this many model latencies are judged."""
    accuracy_drop_points: float = 0.5
    """accuracy_drop fires when the window's accuracy on labelled answers is more than this many percentage points
    below the reference (the model card's test accuracy)."""
    min_feedback: int = 200
    """accuracy_drop gives no verdict on fewer labels than this in the window. Half a point is a small step: the
    standard error of an accuracy near 99% is 0.7 points on 200 labels and 0.3 on 1000."""
    reference_accuracy: float | None = None
    """The accuracy to compare with, in [0, 1]; null: the model card's figure (eval/test/metrics.json, else the test
    accuracy in summary.json, else the validation accuracy)."""
    latency_ratio: float = 2.0
    """latency fires when the window's median model latency exceeds this many times the startup baseline."""
    min_latency_samples: int = 50
    """latency gives no verdict on fewer latencies than this in the window (cache hits are left out)."""
    class_error: float = 0.10
    """class_error fires when the error rate on labelled answers of one true class exceeds this share."""
    min_class_feedback: int = 20
    """A class is judged only with at least this many labels of it in the window."""
    webhook_url: str | None = field(default=None, repr=False)
    """POST a JSON message here when an alert starts or stops firing (http:// or https://); null: no webhook. Also
    from the environment variable DIGITKIT_ALERT_WEBHOOK_URL, for URLs that carry a token."""
    webhook_timeout_s: float = 5.0
    """Seconds one delivery attempt may take (connect, send, answer)."""
    webhook_tries: int = 3
    """Attempts per message (a 2xx answer ends them; a 4xx other than 408 and 429 is not retried)."""
    webhook_backoff_s: float = 1.0
    """Wait before the second attempt; doubled before each further one."""
    webhook_queue: int = 100
    """Messages waiting for delivery; when full the oldest is dropped (and counted)."""

    def __post_init__(self) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        for name, example in (("window", 1000), ("min_feedback", 200), ("min_latency_samples", 50),
                              ("min_class_feedback", 20), ("webhook_tries", 3), ("webhook_queue", 100)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                raise ConfigError(f"alerts.{name} = {value!r}: expected a whole number from 1 to 1,000,000 "
                                  f"(e.g. {example})")  # fmt: skip
        for name in ("min_feedback", "min_latency_samples", "min_class_feedback"):
            if getattr(self, name) > self.window:
                raise ConfigError(f"alerts.{name} = {getattr(self, name)} exceeds alerts.window = {self.window}: the "
                                  "alert could never fire; lower it or raise the window")  # fmt: skip
        if self.webhook_tries > 10:
            raise ConfigError(f"alerts.webhook_tries = {self.webhook_tries}: expected at most 10 attempts (e.g. 3)")
        points = self.accuracy_drop_points
        if not (number(points) and 0 <= points < 100):
            raise ConfigError(f"alerts.accuracy_drop_points = {points!r}: expected percentage points from 0 to under "
                              "100 (e.g. 0.5: alert when accuracy falls from 99.0% to below 98.5%)")  # fmt: skip
        ref = self.reference_accuracy
        if ref is not None and not (number(ref) and 0 < ref <= 1):
            raise ConfigError(f"alerts.reference_accuracy = {ref!r}: expected a share in (0, 1] (e.g. 0.99), or null "
                              "for the model card's figure")  # fmt: skip
        if not (number(self.latency_ratio) and 1 < self.latency_ratio <= 1000):
            raise ConfigError(f"alerts.latency_ratio = {self.latency_ratio!r}: expected a ratio above 1 (e.g. 2: alert "
                              "when the median latency doubles)")  # fmt: skip
        if not (number(self.class_error) and 0 <= self.class_error < 1):
            raise ConfigError(f"alerts.class_error = {self.class_error!r}: expected a share from 0 to under 1 (e.g. "
                              "0.1 for 10%)")  # fmt: skip
        for name, top in (("webhook_timeout_s", 300), ("webhook_backoff_s", 600)):
            value = getattr(self, name)
            if not (number(value) and 0 < value <= top):
                raise ConfigError(f"alerts.{name} = {value!r}: expected seconds, more than 0 and at most {top}")
        if self.webhook_url is not None:
            check_webhook_url(self.webhook_url)


def check_webhook_url(url: Any) -> None:
    """A ConfigError unless `url` is an absolute http(s) URL with a host (the URL itself is not repeated: it may hold
    a token)."""
    from urllib.parse import urlsplit

    what = "alerts.webhook_url (or DIGITKIT_ALERT_WEBHOOK_URL)"
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{what}: expected an http:// or https:// URL, got {type(url).__name__}")
    if len(url) > MAX_WEBHOOK_URL or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise ConfigError(f"{what}: {len(url)} characters with spaces or control characters, or over "
                          f"{MAX_WEBHOOK_URL}; expected a plain http:// or https:// URL")  # fmt: skip
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number in 1-65535 raises here
    except ValueError as e:
        raise ConfigError(f"{what}: not a valid URL ({e}); expected e.g. https://alerts.example.com/hook") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{what}: the scheme is {parts.scheme or '(none)'!r}; expected http or https, e.g. "
                          "https://alerts.example.com/hook")  # fmt: skip
    if not parts.hostname:
        raise ConfigError(f"{what}: no host; expected e.g. https://alerts.example.com/hook")


MAX_PRUNE_EVERY_S = 7 * 86400


@dataclass
class AuditSettings:
    """Retention of the audit log, applied by the server in a background thread (and by `digitkit audit prune`).

    Both limits None (the default) keep every prediction. The age limit applies to every row, labelled or not;
    max_rows deletes unlabelled rows first (oldest first), so labelled rows, the ones that become training data,
    are kept longest: they go (oldest first) only when they alone exceed max_rows.
    """

    max_age_days: float | None = None
    """Delete predictions older than this many days (e.g. 30, or 0.5 for 12 hours); None keeps any age."""
    max_rows: int | None = None
    """Keep at most this many predictions; None keeps any number."""
    prune_every_s: float = 3600.0
    """Seconds between two prunes by the server (the first runs at startup); only used when a limit is set."""

    def __post_init__(self) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        days, rows, every = self.max_age_days, self.max_rows, self.prune_every_s
        if days is not None and not (number(days) and days > 0):
            raise ConfigError(f"audit.max_age_days = {days!r}: expected a number of days > 0 (e.g. 30), or null to "
                              "keep predictions of any age")  # fmt: skip
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ConfigError(f"audit.max_rows = {rows!r}: expected a positive number of rows (e.g. 1000000), or "
                              "null to keep any number")  # fmt: skip
        if not (number(every) and 1 <= every <= MAX_PRUNE_EVERY_S):
            raise ConfigError(f"audit.prune_every_s = {every!r}: expected seconds between prunes, from 1 to "
                              f"{MAX_PRUNE_EVERY_S:,} (a week); e.g. 3600")  # fmt: skip

    @property
    def max_age_s(self) -> float | None:
        return self.max_age_days * 86400 if self.max_age_days is not None else None

    @property
    def enabled(self) -> bool:
        return self.max_age_days is not None or self.max_rows is not None


@dataclass
class ServeSettings:
    model: str = "runs/latest"
    """Run folder or checkpoint file of a single-digit classifier: /v1/predict, /v1/explain and the drawing page."""
    reader: str = ""
    """Run folder or checkpoint file of a row reader (task: sequence, `digitkit train --config configs/read.yaml`)
    that answers /v1/read, reading a whole row without cutting it into digits. Empty: /v1/read cuts the row into
    digits and classifies each with `model`. With engine onnx it runs from its run's export/model.onnx."""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    audit_db: str | None = None
    """SQLAlchemy URL or SQLite file path; None: serve/audit.db inside the run folder (or beside the checkpoint)."""
    threads: int = 1
    """Torch threads per worker. One request is one small forward pass: a second thread costs more in handoff
    than it saves, and the worker's thread pool already runs requests side by side."""
    cache_size: int = 4096
    """Answers kept by input hash (0 turns the cache off)."""
    log_level: str = "info"
    engine: str = "torch"
    """torch, or onnx: answer through ONNX Runtime from the run's export/model.onnx (`digitkit export RUN`; it must
    come from the same checkpoint). Explanations still use the PyTorch model of that checkpoint."""
    pin_cpu: bool = True
    """Pin each worker process to one CPU core (Linux), the workers spread over the cores in turn: the event loop
    and the thread answering requests then hand work over on one core instead of waking another
    (digitkit.serve.cpu; 1.6 against 2.9 ms per PNG on a 2-vCPU virtual machine). Single-worker servers of one
    user take the cores in turn machine-wide. false lets the OS move them (e.g. beside other busy services)."""
    http: str = "auto"
    """The HTTP parser: httptools (llhttp, in C), h11 (pure Python, about 15% fewer requests a second on 2 cores),
    or auto: httptools when it is installed, else h11. Both carry the same connection limits."""
    limits: LimitSettings = field(default_factory=LimitSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    """Micro-batching of concurrent single-image predictions (wait_ms, max_images); wait_ms 0 turns it off."""
    drift: DriftSettings = field(default_factory=DriftSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    """Audit-log retention (max_age_days, max_rows, prune_every_s); the default keeps everything."""
    alerts: AlertSettings = field(default_factory=AlertSettings)
    """Alert conditions, their thresholds and the webhook (digitkit.serve.alerts)."""
    api_key: str | None = field(default=None, repr=False)
    """Required on prediction routes when set (header X-API-Key or Authorization: Bearer)."""
    admin_token: str | None = field(default=None, repr=False)
    """Required on admin routes; without one they are disabled."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port}: expected 0-65535")
        if self.engine not in ("torch", "onnx"):
            raise ConfigError(f"engine {self.engine!r}: expected torch or onnx (onnx needs `digitkit export RUN` "
                              "first)")
        if not isinstance(self.pin_cpu, bool):
            raise ConfigError(f"pin_cpu {self.pin_cpu!r}: expected true or false")
        if self.http not in ("auto", "httptools", "h11"):
            raise ConfigError(f"http {self.http!r}: expected auto, httptools or h11 (the HTTP parser; auto takes "
                              "httptools when it is installed)")
        if not isinstance(self.reader, str):
            raise ConfigError(f"reader {self.reader!r}: expected the path of a row-reader run folder or checkpoint "
                              "(or nothing, to read rows with the digit classifier)")  # fmt: skip
        if self.workers < 1 or self.threads < 1 or self.cache_size < 0:
            raise ConfigError("workers and threads must be >= 1 and cache_size >= 0")
        for name in ("api_key", "admin_token"):
            value = getattr(self, name)
            if value is not None and len(value) < 8:
                raise ConfigError(f"the {name.replace('_', ' ')} is {len(value)} characters; use at least 8 "
                                  "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")  # fmt: skip

    def audit_url(self, model_dir: Path) -> str:
        if self.audit_db:
            return self.audit_db
        return f"sqlite:///{(model_dir / 'serve' / 'audit.db').resolve()}"

    def to_env(self) -> str:
        """JSON for SETTINGS_ENV (secrets included: the variable lives only in this process and its workers)."""
        return json.dumps(dataclasses.asdict(self))


def from_dict(raw: dict[str, Any], source: str = "settings") -> ServeSettings:
    from digitkit.config import _build  # the same strict builder as the run config: unknown keys are errors

    try:
        return _build(ServeSettings, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path | None, overrides: dict[str, Any], secrets_from: dict[str, str | None]) -> ServeSettings:
    """YAML file (optional), then command-line values (None = not given), then secrets from files or env."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: settings file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping (model:, port:, limits:, drift: ...)")
        for secret in ("api_key", "admin_token"):
            if secret in raw:
                raise ConfigError(f"{path}: {secret} does not belong in a settings file; set DIGITKIT_"
                                  f"{secret.upper()} or pass --{secret.replace('_', '-')}-file")  # fmt: skip
    raw.update({k: v for k, v in overrides.items() if v is not None})
    hook = os.environ.get(ALERT_WEBHOOK_ENV) or None
    if hook is not None:
        alerts = raw.setdefault("alerts", {})
        if isinstance(alerts, dict):  # anything else is reported by the strict builder
            alerts["webhook_url"] = hook
    for secret, file_name in secrets_from.items():
        value = os.environ.get(f"DIGITKIT_{secret.upper()}") or None
        if file_name:
            try:
                value = Path(file_name).read_text().strip()
            except OSError as e:
                flag = f"--{secret.replace('_', '-')}-file"
                raise ConfigError(f"{flag} {file_name}: cannot read it ({e.strerror})") from None
        raw[secret] = value
    return from_dict(raw, str(path) if path else "settings")
