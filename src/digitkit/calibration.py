"""Temperature scaling: confidence that means what it says.

A model trained with label smoothing never puts more than about 1 - smoothing on its top class, so a clean,
unmistakable digit shows "89.7% sure". Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural
Networks") divides the logits by one number T before the softmax, fitted on held-out data to minimise the log loss:
T < 1 sharpens an under-confident model, T > 1 softens an over-confident one. The top class never changes (the
argmax of logits / T is the argmax of the logits), so accuracy is untouched.

T is fitted on the run's validation split only (the test set stays sealed), stored in the kept checkpoint as
`temperature` (details under `calibration`), and applied wherever a confidence is shown: the Recognizer behind
predict, read, the API and the web page; `digitkit evaluate`; and inside the ONNX graph. A checkpoint without it
(older runs) answers with T = 1, the raw softmax.

Pure: tensors in, numbers out; no files, no printing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from digitkit.errors import DataError

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
"""The fitted T is clipped to this range: beyond it the validation set is telling us nothing useful (a separable
set drives T towards 0, a useless model towards infinity)."""


@dataclass
class Calibration:
    """What `calibrate` found: the temperature and what it did to the held-out log loss and ECE."""

    temperature: float
    fitted: bool
    """False when there was nothing to fit on (no validation split): temperature is then 1.0, the raw softmax."""
    source: str
    """Where T was fitted, e.g. "validation split (6,000 images)", or why it was not."""
    images: int = 0
    nll_before: float | None = None
    """Mean log loss on the fitting images at T = 1 and at the fitted T."""
    nll_after: float | None = None
    ece_before: float | None = None
    """Expected calibration error (digitkit.metrics.calibration, 15 bins) at T = 1 and at the fitted T."""
    ece_after: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K) float64, labels (N,) int64), or ValueError saying what was wrong."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"expected logits (N, K) and labels (N,); got logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if len(labels) == 0 or logits.shape[1] < 2:
        raise ValueError(f"nothing to fit a temperature on: {len(labels)} examples of {logits.shape[1]} classes "
                         "(need at least one example and two classes)")  # fmt: skip
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must be in [0, {logits.shape[1]}); got {int(labels.min())}..{int(labels.max())}")
    logits = logits.detach().cpu().double()
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite (no NaN or inf): pass the model's raw outputs, before the softmax")
    return logits, labels.detach().cpu().long()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean cross-entropy of softmax(logits (N, K) / temperature) against labels (N,)."""
    logits, labels = _checked(logits, labels)
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the mean log loss of softmax(logits / T).

    logits (N, K) raw model outputs (before the softmax), labels (N,) class indices. The log loss is convex in 1/T
    (a log-sum-exp of linear functions minus a linear one), so it has one minimum along log T, found by golden-section
    search: deterministic, no learning rate, and exact to about 1e-9 in log T after 80 steps (float64 throughout).
    """
    logits, labels = _checked(logits, labels)
    picked = logits.gather(1, labels[:, None])[:, 0]

    def loss(log_t: float) -> float:
        beta = math.exp(-log_t)
        return float((torch.logsumexp(logits * beta, 1) - picked * beta).mean())

    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(min(max(math.exp((lo + hi) / 2), MIN_TEMPERATURE), MAX_TEMPERATURE))


def calibrated_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits (N, K) / temperature) -> (N, K) float32."""
    return (logits.float() / temperature).softmax(1)


def calibrate(logits: torch.Tensor, labels: torch.Tensor, source: str, bins: int = 15) -> Calibration:
    """Fit T on (logits (N, K), labels (N,)) and measure log loss and ECE on the same images before and after."""
    from digitkit import metrics

    temperature = fit_temperature(logits, labels)
    before, after = calibrated_probs(logits, 1.0), calibrated_probs(logits, temperature)
    return Calibration(
        temperature=round(temperature, 6), fitted=True, source=source, images=len(labels),
        nll_before=nll(logits, labels), nll_after=nll(logits, labels, temperature),
        ece_before=metrics.calibration(before, labels, bins)["ece"],
        ece_after=metrics.calibration(after, labels, bins)["ece"],
    )  # fmt: skip


def not_fitted(reason: str) -> Calibration:
    """T = 1 (the raw softmax), recorded as not fitted, with the reason."""
    return Calibration(temperature=1.0, fitted=False, source=reason)


def temperature_of(ckpt: dict[str, Any]) -> float:
    """The checkpoint's temperature; 1.0 for a checkpoint written before calibration existed."""
    t = ckpt.get("temperature", 1.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise DataError(f"the checkpoint's temperature {t!r} is not a positive number; refit it with "
                        "`digitkit calibrate RUN`")  # fmt: skip
    return float(t)


def check_temperature(temperature: float) -> float:
    """A usable temperature (finite, > 0), or ValueError."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:  # fmt: skip
        raise ValueError(f"temperature {temperature!r}: expected a positive finite number (1.0 = the raw softmax)")
    return float(temperature)
