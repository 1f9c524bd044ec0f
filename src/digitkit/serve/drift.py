"""Is live traffic still what the model was measured on? Rolling statistics against a stored baseline.

The baseline is stored with the model (`<run>/baseline.json`, keyed by the checkpoint's SHA-256): the predicted-
class distribution, mean confidence and rejection rate of the model on its own validation images, answered the
way the server answers. Latency has no stored baseline (it belongs to the machine, not the model): the server
measures it at startup.

Without reference data (the run's data folder is missing on the serving machine) the server falls back to a uniform
prior (`measured` false, source "uniform prior (no data)"). A fallback is never stored: the next start or reload
that finds the data measures the real baseline and stores it, and a stored fallback (written by older versions) is
ignored and recomputed.

Signals (thresholds in `DriftSettings`):
  class_shift       total-variation distance between predicted-class distributions (answered images only)
  confidence_drop   baseline mean confidence minus the window's
  rejection_rise    the window's rejection rate minus the baseline's
  latency_ratio     the window's median latency over the baseline's
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digitkit.serve.settings import DriftSettings

log = logging.getLogger("digitkit.serve")

SIGNALS = ("class_shift", "confidence_drop", "rejection_rise", "latency_ratio")
BASELINE_FILE = "baseline.json"
FALLBACK_SOURCE = "uniform prior (no data)"
FALLBACK_CONFIDENCE = 0.9
"""The fallback's mean confidence: a guess (a trained MNIST model is usually above it), not a measurement."""


@dataclass
class Baseline:
    class_distribution: dict[str, float]
    mean_confidence: float
    rejection_rate: float
    images: int
    source: str
    latency_ms: float | None = None
    measured: bool = True
    """False for the uniform fallback used when no reference data was found: never stored, recomputed next start."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "latency_ms"}


def uniform_baseline(classes: list[str]) -> Baseline:
    """The fallback when no reference images are at hand: every class equally likely, nothing rejected."""
    k = max(len(classes), 1)
    return Baseline({c: 1 / k for c in classes}, FALLBACK_CONFIDENCE, 0.0, 0, FALLBACK_SOURCE, measured=False)


def compute_baseline(answers: list[Any], classes: list[str], source: str) -> Baseline:
    """From Recognizer answers on reference images (the validation split)."""
    answered = [a for a in answers if a.digit is not None]
    counts = {c: 0 for c in classes}
    for a in answered:
        counts[a.digit] += 1
    n = max(len(answered), 1)
    return Baseline(
        class_distribution={c: round(k / n, 6) for c, k in counts.items()},
        mean_confidence=round(sum(a.confidence for a in answered) / n, 6),
        rejection_rate=round(1 - len(answered) / max(len(answers), 1), 6),
        images=len(answers),
        source=source,
        measured=bool(answers),
    )


def load_baseline(run_dir: Path, checkpoint_sha256: str) -> Baseline | None:
    path = run_dir / BASELINE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if raw.get("checkpoint_sha256") != checkpoint_sha256:
        return None  # written for another checkpoint (the run was resumed or the file copied): recompute
    raw.pop("checkpoint_sha256")
    try:
        baseline = Baseline(**raw)
    except TypeError:
        return None
    # Files from before `measured` existed may hold the fallback: it was never measured, so measure it now.
    if not baseline.measured or not baseline.images or baseline.source == FALLBACK_SOURCE:
        log.info("%s holds a fallback drift baseline, not a measured one: measuring it again", path)
        return None
    return baseline


def save_baseline(baseline: Baseline, run_dir: Path, checkpoint_sha256: str) -> None:
    from digitkit.idx import atomic_write_bytes

    if not baseline.measured:  # a guess stored as if measured would outlive the missing data forever
        log.debug("drift baseline not stored: %s is a fallback, not a measurement", baseline.source)
        return
    payload = {**baseline.to_json(), "checkpoint_sha256": checkpoint_sha256}
    try:
        atomic_write_bytes(run_dir / BASELINE_FILE, (json.dumps(payload, indent=2) + "\n").encode())
    except OSError as e:  # a read-only model folder still serves; the baseline is recomputed next start
        log.warning("could not store the drift baseline in %s (%s)", run_dir, e)


class DriftMonitor:
    """Thread-safe rolling window; `observe` is called once per answered or rejected image."""

    def __init__(self, baseline: Baseline, settings: DriftSettings) -> None:
        self.baseline = baseline
        self.settings = settings
        self._window: deque[tuple[str | None, float, float | None]] = deque(maxlen=settings.window)
        self._lock = threading.Lock()
        self._since_check = 0
        self.values: dict[str, float] = dict.fromkeys(SIGNALS, 0.0)
        self.alerts: dict[str, bool] = dict.fromkeys(SIGNALS, False)

    def observe(self, digit: str | None, confidence: float, latency_ms: float | None) -> None:
        """One answer; `latency_ms` None when it says nothing about the model (a cache hit)."""
        with self._lock:
            self._window.append((digit, confidence, latency_ms))
            self._since_check += 1
            if self._since_check >= self.settings.check_every and len(self._window) >= self.settings.min_samples:
                self._since_check = 0
                self._check()

    def window_stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        rows = list(self._window)
        answered = [(d, c) for d, c, _ in rows if d is not None]
        latencies = [t for _, _, t in rows if t is not None]
        n = max(len(answered), 1)
        dist = {c: 0.0 for c in self.baseline.class_distribution}
        for d, _ in answered:
            dist[d] = dist.get(d, 0.0) + 1 / n
        return {
            "size": len(rows),
            "class_distribution": dist,
            "mean_confidence": sum(c for _, c in answered) / n if answered else 0.0,
            "rejection_rate": 1 - len(answered) / len(rows) if rows else 0.0,
            "median_latency_ms": statistics.median(latencies) if latencies else 0.0,
        }

    def _check(self) -> None:
        s, b, cfg = self._stats(), self.baseline, self.settings
        keys = set(b.class_distribution) | set(s["class_distribution"])
        tv = 0.5 * sum(abs(b.class_distribution.get(k, 0.0) - s["class_distribution"].get(k, 0.0)) for k in keys)
        values = {
            "class_shift": tv,
            "confidence_drop": b.mean_confidence - s["mean_confidence"],
            "rejection_rise": s["rejection_rate"] - b.rejection_rate,
            "latency_ratio": s["median_latency_ms"] / b.latency_ms if b.latency_ms else 0.0,
        }
        limits = {"class_shift": cfg.class_shift, "confidence_drop": cfg.confidence_drop,
                  "rejection_rise": cfg.rejection_rise, "latency_ratio": cfg.latency_ratio}  # fmt: skip
        for name, value in values.items():
            self.values[name] = round(value, 6)
            crossed = value > limits[name]
            if crossed and not self.alerts[name]:
                log.warning("drift: %s = %.3f crossed its threshold %.3f over the last %d predictions",
                            name, value, limits[name], s["size"])  # fmt: skip
            elif self.alerts[name] and not crossed:
                log.info("drift: %s = %.3f back under its threshold %.3f", name, value, limits[name])
            self.alerts[name] = crossed
