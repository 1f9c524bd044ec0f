"""Alerts that act: conditions judged over sliding windows, with a state the server exports and a webhook it calls.

Pure logic, no HTTP framework: the app feeds `Alerts` every answered prediction's model latency and every label
from /v1/feedback; `Alerts` keeps bounded windows (the last `alerts.window` of each) and judges after every
observation:

  accuracy_drop  the window's accuracy on labelled answers, in percentage points below the reference (the model
                 card's test accuracy); fires above `accuracy_drop_points` once `min_feedback` labels are in
  latency        the window's median model latency over the startup baseline (drift.Baseline.latency_ms); fires
                 above `latency_ratio` once `min_latency_samples` latencies are in (cache hits are left out)
  class_error    per true class, the share of its labelled answers that were wrong; fires when a class with at least
                 `min_class_feedback` labels is above `class_error` (`detail.classes` names them)

Labels of rejected predictions are left out (a rejection is not a wrong answer: the drift monitor's rejection_rise
watches rejections). A second label for the same request replaces the first. Each alert's state (firing, value,
threshold, count it rests on, since when) is at /v1/alerts and in the gauges digitkit_alert_*; a change of state
(quiet -> firing, firing -> resolved) is logged and posted to the webhook by `Webhook`, a background thread with a
bounded queue and bounded retries that never blocks or fails a request.

The windows belong to one process: with `--workers N` each worker judges the traffic and labels it received.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from digitkit.serve.settings import AlertSettings

log = logging.getLogger("digitkit.serve")

ALERTS = ("accuracy_drop", "latency", "class_error")
MAX_ANSWER_BYTES = 4096
"""Of a webhook's answer body, read at most this much (and only to free the connection)."""


@dataclass
class Reference:
    """The accuracy accuracy_drop compares with, and where it came from."""

    accuracy: float | None
    source: str


def card_accuracy(run_dir: Path | None, metrics: dict[str, Any], checkpoint_sha256: str,
                  override: float | None = None) -> Reference:  # fmt: skip
    """The model card's accuracy figure (digitkit.card): `digitkit evaluate`'s test accuracy when it is of this
    checkpoint, else the run's test accuracy (summary.json, in `metrics`), else its validation accuracy; `override`
    (alerts.reference_accuracy) before all of them."""
    if override is not None:
        return Reference(float(override), "alerts.reference_accuracy")
    if run_dir is not None:
        try:
            ev = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
        except (OSError, ValueError):
            ev = {}
        acc = ev.get("accuracy") if isinstance(ev, dict) else None
        if _share(acc) and ev.get("checkpoint_sha256") in (None, checkpoint_sha256):
            return Reference(float(acc), "eval/test/metrics.json (digitkit evaluate)")
    for key, source in (("test_accuracy", "summary.json test_accuracy"),
                        ("val_accuracy", "summary.json val_accuracy (no test figure)")):  # fmt: skip
        if _share(metrics.get(key)):
            return Reference(float(metrics[key]), source)
    return Reference(None, "none: the run has no accuracy figure; set alerts.reference_accuracy")


def _share(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0 < x <= 1


@dataclass
class AlertState:
    name: str
    threshold: float
    minimum: int
    """Samples needed before a verdict."""
    since: float
    """When the alert last changed state (firing since, or quiet since), epoch seconds."""
    firing: bool = False
    value: float | None = None
    """None: no verdict (too few samples, or nothing to compare with)."""
    count: int = 0
    """The samples the value rests on."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "firing": self.firing, "value": self.value, "threshold": self.threshold,
                "count": self.count, "minimum": self.minimum, "since": self.since, "detail": self.detail}  # fmt: skip


class Alerts:
    """Thread-safe; `observe_latency` once per computed answer, `observe_feedback` once per label.

    `notify` is called with a message for every change of state, outside the lock; it must not block (the server
    passes `Webhook.send`)."""

    def __init__(self, settings: AlertSettings, reference: Reference, baseline_latency_ms: float | None,
                 classes: list[str], model_version: str = "", notify: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.settings, self.notify, self.clock = settings, notify, clock
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=settings.window)
        self._by_latency: list[float] = []
        """The same window kept sorted (bisect), so that the median read on every answer costs no sort."""
        self._labels: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._seq = 0
        self._configure(reference, baseline_latency_ms, classes, model_version)

    def _configure(self, reference: Reference, baseline_latency_ms: float | None, classes: list[str],
                   model_version: str) -> None:  # fmt: skip
        cfg, now = self.settings, self.clock()
        self.reference, self.baseline_latency_ms = reference, baseline_latency_ms
        self.classes, self.model_version = list(classes), model_version
        self.states = {
            "accuracy_drop": AlertState("accuracy_drop", cfg.accuracy_drop_points, cfg.min_feedback, now),
            "latency": AlertState("latency", cfg.latency_ratio, cfg.min_latency_samples, now),
            "class_error": AlertState("class_error", cfg.class_error, cfg.min_class_feedback, now),
        }

    # ------------------------------------------------------------------------------------------ input
    def observe_latency(self, latency_ms: float) -> None:
        """The time one image took to answer (not a cache hit: that says nothing about the model)."""
        if not (isinstance(latency_ms, int | float) and latency_ms >= 0):
            return
        with self._lock:
            if len(self._latencies) == self._latencies.maxlen:
                del self._by_latency[bisect.bisect_left(self._by_latency, self._latencies[0])]
            self._latencies.append(float(latency_ms))
            bisect.insort(self._by_latency, float(latency_ms))
            events = self._judge(("latency",))
        self._send(events)

    def observe_feedback(self, predicted: str | None, true_label: str, key: str | None = None) -> None:
        """A label: `predicted` is the served answer (None when it was rejected: left out), `key` the request id (a
        second label for it replaces the first)."""
        if predicted is None:
            return
        with self._lock:
            if key is None:
                self._seq += 1
                key = f"#{self._seq}"
            self._labels.pop(key, None)
            self._labels[key] = (str(predicted), str(true_label))
            while len(self._labels) > self.settings.window:
                self._labels.popitem(last=False)
            events = self._judge(("accuracy_drop", "class_error"))
        self._send(events)

    def reset(self, reference: Reference, baseline_latency_ms: float | None, classes: list[str],
              model_version: str) -> None:  # fmt: skip
        """A new model (admin reload): empty windows; a firing alert is resolved (and notified as such)."""
        with self._lock:
            events = []
            for old in self.states.values():
                if old.firing:  # told as the old model's: the message says which model it was about
                    old.firing, old.since = False, self.clock()
                    old.detail = {**old.detail, "reason": f"model reloaded ({model_version}): the windows start again"}
                    events.append(self._message(old, "resolved"))
            self._latencies.clear()
            self._by_latency.clear()
            self._labels.clear()
            self._configure(reference, baseline_latency_ms, classes, model_version)
        self._send(events)

    # ------------------------------------------------------------------------------------------ output
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "alerts": {name: s.to_json() for name, s in self.states.items()},
                "firing": [name for name, s in self.states.items() if s.firing],
                "reference_accuracy": self.reference.accuracy,
                "reference_source": self.reference.source,
                "baseline_latency_ms": self.baseline_latency_ms,
                "window": self.settings.window,
                "labels_in_window": len(self._labels),
                "latencies_in_window": len(self._latencies),
                "model_version": self.model_version,
            }

    def summary(self) -> dict[str, Any]:
        """The short form for /v1/model."""
        with self._lock:
            return {"firing": [n for n, s in self.states.items() if s.firing],
                    "reference_accuracy": self.reference.accuracy, "reference_source": self.reference.source,
                    "details": "/v1/alerts"}  # fmt: skip

    # ------------------------------------------------------------------------------------------ judging
    def _judge(self, names: tuple[str, ...]) -> list[dict[str, Any]]:
        events = []
        for name in names:
            state = self.states[name]
            value, count, detail = getattr(self, f"_{name}")()
            state.value = None if value is None else round(value, 6)
            state.count, state.detail = count, detail
            crossed = state.value is not None and state.value > state.threshold  # rounded: 0.5 is not over 0.5
            if crossed != state.firing:
                state.firing, state.since = crossed, self.clock()
                events.append(self._message(state, "firing" if crossed else "resolved"))
        return events

    def _accuracy_drop(self) -> tuple[float | None, int, dict[str, Any]]:
        n = len(self._labels)
        correct = sum(1 for p, t in self._labels.values() if p == t)
        ref = self.reference.accuracy
        detail = {"window_accuracy": round(correct / n, 6) if n else None, "reference_accuracy": ref,
                  "reference_source": self.reference.source}  # fmt: skip
        if ref is None or n < self.settings.min_feedback:
            return None, n, detail
        return (ref - correct / n) * 100, n, detail

    def _latency(self) -> tuple[float | None, int, dict[str, Any]]:
        n, base = len(self._latencies), self.baseline_latency_ms
        median = _median_sorted(self._by_latency) if n else None
        detail = {"median_ms": None if median is None else round(median, 3), "baseline_ms": base}
        if median is None or not base or n < self.settings.min_latency_samples:
            return None, n, detail
        return median / base, n, detail

    def _class_error(self) -> tuple[float | None, int, dict[str, Any]]:
        totals: dict[str, int] = {}
        wrong: dict[str, int] = {}
        for p, t in self._labels.values():  # at most alerts.window labels
            totals[t] = totals.get(t, 0) + 1
            if p != t:
                wrong[t] = wrong.get(t, 0) + 1
        judged = {c: (wrong.get(c, 0) / k, k) for c, k in totals.items() if k >= self.settings.min_class_feedback}
        over = {c: {"error": round(e, 6), "count": k} for c, (e, k) in sorted(judged.items())
                if e > self.settings.class_error}  # fmt: skip
        detail = {"classes": over, "judged_classes": sorted(judged)}
        if not judged:
            return None, sum(totals.values()), detail
        worst = max(judged, key=lambda c: judged[c][0])
        detail["worst_class"] = worst
        return judged[worst][0], judged[worst][1], detail

    def _message(self, state: AlertState, status: str) -> dict[str, Any]:
        return {"alert": state.name, "status": status, "value": state.value, "threshold": state.threshold,
                "count": state.count, "since": state.since, "detail": state.detail,
                "model_version": self.model_version, "summary": _describe(state, status)}  # fmt: skip

    def _send(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            (log.warning if event["status"] == "firing" else log.info)("alert %s: %s", event["alert"],
                                                                       event["summary"])  # fmt: skip
            if self.notify is not None:
                try:
                    self.notify(event)
                except Exception:  # noqa: BLE001 - an alert must never fail the request that raised it
                    log.exception("alert %s: could not queue the webhook message", event["alert"])


def _describe(state: AlertState, status: str) -> str:
    d, verb = state.detail, f"{state.name} {'fired' if status == 'firing' else 'resolved'}"
    if "reason" in d:
        return f"{verb}: {d['reason']}"
    if state.name == "accuracy_drop":
        acc = d.get("window_accuracy")
        shown = "no verdict" if acc is None else f"{acc:.2%}"
        return (f"{verb}: accuracy {shown} on the last {state.count} labels, {state.value} points below the reference "
                f"{d.get('reference_accuracy')} (threshold {state.threshold} points)")  # fmt: skip
    if state.name == "latency":
        return (f"{verb}: median latency {d.get('median_ms')} ms over the last {state.count} answers, "
                f"{state.value}x the startup baseline {d.get('baseline_ms')} ms (threshold {state.threshold}x)")
    classes = ", ".join(f"{c} ({v['error']:.1%} of {v['count']})" for c, v in d.get("classes", {}).items())
    return (f"{verb}: error rate per true class over {state.threshold:.0%} for {classes or 'no class'} "
            f"(worst {d.get('worst_class')}: {state.value})")


# ------------------------------------------------------------------------------------------ the webhook
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: it is not followed (it would turn the POST into a GET elsewhere)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Webhook:
    """Posts messages as JSON from one background thread: `send` only queues (O(1), never blocks). The queue holds
    `webhook_queue` messages (when full the oldest is dropped and counted); each message gets up to `webhook_tries`
    attempts of at most `webhook_timeout_s`, `webhook_backoff_s` apart (doubling). Counts: `outcomes`."""

    def __init__(self, url: str, settings: AlertSettings, user_agent: str = "digitkit") -> None:
        self.url, self.settings, self.user_agent = url, settings, user_agent
        parts = urlsplit(url)
        self.where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        """What the log shows of the URL (its path and query may hold a token)."""
        self.outcomes = {"delivered": 0, "failed": 0, "dropped": 0, "retried": 0}
        self._queue: deque[dict[str, Any]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._thread = threading.Thread(target=self._run, name="digitkit-alert-webhook", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._queue) >= self.settings.webhook_queue:
                self._queue.popleft()
                self.outcomes["dropped"] += 1
                log.warning("alert webhook %s: queue full (alerts.webhook_queue = %d), the oldest message dropped",
                            self.where, self.settings.webhook_queue)  # fmt: skip
            self._queue.append(message)
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self, wait_s: float = 2.0) -> None:
        """Stop: messages not yet delivered are dropped (counted), an attempt under way gets `wait_s` to end."""
        with self._cv:
            self._closed = True
            self.outcomes["dropped"] += len(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(wait_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                message = self._queue.popleft()
            try:
                self._deliver(message)
            except Exception:  # noqa: BLE001 - the thread must outlive any one message
                log.exception("alert webhook %s: delivery failed", self.where)
                with self._cv:
                    self.outcomes["failed"] += 1

    def _deliver(self, message: dict[str, Any]) -> None:
        cfg = self.settings
        body = json.dumps(message).encode()
        why = ""
        for attempt in range(1, cfg.webhook_tries + 1):
            request = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": self.user_agent})  # fmt: skip
            retry = True
            try:
                with self._opener.open(request, timeout=cfg.webhook_timeout_s) as answer:
                    answer.read(MAX_ANSWER_BYTES)
                    status = answer.status
                if 200 <= status < 300:
                    with self._cv:
                        self.outcomes["delivered"] += 1
                    return
                why = f"HTTP {status}"
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
                retry = not (400 <= e.code < 500 and e.code not in (408, 429))
                e.close()
            except (urllib.error.URLError, OSError, HTTPException, ValueError) as e:
                why = str(getattr(e, "reason", None) or e) or type(e).__name__
            if not retry or attempt == cfg.webhook_tries:
                break
            with self._cv:
                self.outcomes["retried"] += 1
                if self._cv.wait_for(lambda: self._closed, cfg.webhook_backoff_s * 2 ** (attempt - 1)):
                    break  # closing: no more attempts
        with self._cv:
            self.outcomes["failed"] += 1
        log.warning("alert webhook %s: %s %s not delivered after %d attempt(s) (%s); check alerts.webhook_url and "
                    "the receiver", self.where, message.get("alert"), message.get("status"), attempt, why)  # fmt: skip


def _median_sorted(values: list[float]) -> float:
    """statistics.median of an already sorted, non-empty list."""
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
