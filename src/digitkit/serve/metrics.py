"""Prometheus metrics for the server.

One process: a private registry per app (tests run several apps in one process). Several uvicorn workers:
`digitkit serve --workers N` sets PROMETHEUS_MULTIPROC_DIR before the workers start, every worker writes its
samples there, and /metrics aggregates all workers whichever one answers the scrape.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOP_LAG_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # In multiprocess mode the samples go to files; registering them here would report this worker only.
        reg = None if multiprocess() else self.registry
        self.requests = Counter("digitkit_requests_total", "HTTP requests by route and status code",
                                ["route", "status"], registry=reg)  # fmt: skip
        self.latency = Histogram("digitkit_request_latency_seconds", "Time spent answering, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=reg)  # fmt: skip
        self.predictions = Counter("digitkit_predictions_total", "Answered images by predicted digit", ["digit"],
                                   registry=reg)  # fmt: skip
        self.rejections = Counter("digitkit_rejections_total", "Rejected images by reason", ["reason"], registry=reg)
        self.confidence_sum = Counter("digitkit_confidence_sum", "Sum of the confidence of answered images",
                                      registry=reg)  # fmt: skip
        self.cache_hits = Counter("digitkit_cache_hits_total", "Images answered from the cache", registry=reg)
        self.cache_misses = Counter("digitkit_cache_misses_total", "Images computed (not in the cache)", registry=reg)
        self.feedback = Counter("digitkit_feedback_total", "Labels received through /v1/feedback", registry=reg)
        # Incremented by the HTTP layer when a client goes away before its response was sent (not a status).
        self.client_disconnects = Counter("digitkit_client_disconnects_total",
                                          "Requests whose client disconnected before the response was sent, by route",
                                          ["route"], registry=reg)  # fmt: skip
        # The connection layer (digitkit.serve.protocol): connections answered 503 at limits.max_connections, cut
        # with 408 at limits.header_timeout_s or with 431 over limits.max_header_bytes, before any request was read.
        self.connections_refused = Counter("digitkit_connections_refused_total",
                                           "Connections refused or cut before a request was read, by reason",
                                           ["reason"], registry=reg)  # fmt: skip
        self.loop_lag = Histogram("digitkit_event_loop_lag_seconds",
                                  "How late the event loop woke up (sampled every 20 ms): time it was held",
                                  buckets=LOOP_LAG_BUCKETS, registry=reg)  # fmt: skip
        self.batch_requests = Histogram("digitkit_batch_requests",
                                        "Single-image requests answered together in one micro-batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 256, 1024), registry=reg)  # fmt: skip
        self._live: dict[str, Any] = {}
        self.registry.register(_LiveCollector(self._live))
        if multiprocess():
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(self.registry)

    def observe_answer(self, digit: str | None, confidence: float, rejected: str | None, cached: bool) -> None:
        if rejected is None and digit is not None:
            self.predictions.labels(digit).inc()
            self.confidence_sum.inc(confidence)
        else:
            self.rejections.labels(rejected or "unknown").inc()
        (self.cache_hits if cached else self.cache_misses).inc()

    def set_live(self, **values: Any) -> None:
        """Gauges computed at scrape time from shared state (audit DB, drift window): correct across workers."""
        self._live.update(values)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges read from a dict filled just before each scrape."""

    def __init__(self, live: dict[str, Any]) -> None:
        self.live = live

    def collect(self) -> Any:
        live = self.live
        simple = {
            "digitkit_live_accuracy": "Accuracy on predictions that received a label through /v1/feedback",
            "digitkit_labelled_predictions": "Predictions with a label from /v1/feedback",
            "digitkit_window_mean_confidence": "Mean confidence of answered images in the drift window",
            "digitkit_window_rejection_rate": "Share of rejected images in the drift window",
            "digitkit_window_median_latency_seconds": "Median answer latency in seconds in the drift window (this "
                                                      "worker; cache hits left out)",
            "digitkit_model_loaded": "1 when a model is loaded and serving",
            "digitkit_drift_baseline_measured": "1 when the drift baseline was measured on reference images, 0 when "
                                                "it is the uniform fallback (no reference data at startup)",
        }
        for name, doc in simple.items():
            if name in live and live[name] is not None:
                yield GaugeMetricFamily(name, doc, value=float(live[name]))
        if "drift_alert" in live:
            alert = GaugeMetricFamily("digitkit_drift_alert", "1 while a drift signal is over its threshold",
                                      labels=["signal"])  # fmt: skip
            value = GaugeMetricFamily("digitkit_drift_value", "Current value of each drift signal", labels=["signal"])
            for signal, on in live["drift_alert"].items():
                alert.add_metric([signal], 1.0 if on else 0.0)
                value.add_metric([signal], float(live["drift_value"][signal]))
            yield alert
            yield value
        if "alerts" in live:
            yield from _alert_families(live["alerts"], live.get("alert_webhook"))
        if "model_version" in live:
            info = GaugeMetricFamily("digitkit_model_info", "The model being served", labels=["version"])
            info.add_metric([live["model_version"]], 1.0)
            yield info


def _alert_families(alerts: dict[str, dict[str, Any]], webhook: dict[str, int] | None) -> Any:
    """digitkit.serve.alerts' states: one series per alert (a fixed set of names, never client data)."""
    firing = GaugeMetricFamily("digitkit_alert_firing", "1 while an alert condition holds (digitkit.serve.alerts; "
                               "also at /v1/alerts)", labels=["alert"])  # fmt: skip
    value = GaugeMetricFamily("digitkit_alert_value", "Current value of each alert condition: accuracy_drop in "
                              "percentage points, latency as a ratio to the startup baseline, class_error as the "
                              "worst class's error rate; absent while there are too few samples", labels=["alert"])
    threshold = GaugeMetricFamily("digitkit_alert_threshold", "The value above which each alert fires",
                                  labels=["alert"])  # fmt: skip
    samples = GaugeMetricFamily("digitkit_alert_samples", "Samples the value of each alert rests on (labels, "
                                "latencies, or the worst class's labels)", labels=["alert"])  # fmt: skip
    for name, state in alerts.items():
        firing.add_metric([name], 1.0 if state["firing"] else 0.0)
        threshold.add_metric([name], float(state["threshold"]))
        samples.add_metric([name], float(state["count"]))
        if state["value"] is not None:
            value.add_metric([name], float(state["value"]))
    sent = CounterMetricFamily("digitkit_alert_webhooks", "Alert webhook messages by outcome (delivered, failed "
                               "after every attempt, dropped from a full queue) and retried attempts; no samples "
                               "without alerts.webhook_url", labels=["outcome"])  # fmt: skip
    for outcome, count in (webhook or {}).items():
        sent.add_metric([outcome], float(count))
    yield from (firing, value, threshold, samples, sent)
