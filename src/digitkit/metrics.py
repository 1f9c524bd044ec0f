"""Evaluation metrics: tensors or arrays in, plain numbers, lists and dicts out (JSON-ready).

Pure: no printing, no files. evaluate.py calls these; report.py and plots.py show the results.
Shapes: labels (N,) int class indices, probs (N, K) rows summing to 1, cm (K, K) counts with rows = true class
and columns = predicted class. Accuracies are fractions in [0, 1]; "pp" means percentage points.
Bad input raises ValueError saying what was expected.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _numpy(x: ArrayLike | list) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


def _labels_probs(labels: ArrayLike, probs: ArrayLike, classes: list[str] | None = None) -> tuple[np.ndarray, ...]:
    """Checked (y (N,) int64, p (N, K) in the caller's float dtype)."""
    y, p = _numpy(labels), _numpy(probs)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"expected labels (N,) and probs (N, K); got labels {y.shape} and probs {p.shape}")
    if len(y) == 0:
        raise ValueError("no examples: labels and probs are empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got {y.dtype}")
    k = p.shape[1]
    if classes is not None and len(classes) != k:
        raise ValueError(f"got {len(classes)} class names for probs with {k} columns")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must be in [0, {k}); got {y.min()}..{y.max()}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs must be finite, non-negative and each row must sum to 1: pass softmax(logits)")
    return y.astype(np.int64), p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0.0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ------------------------------------------------------------------------------------------ classification
def classification_metrics(labels: ArrayLike, probs: ArrayLike, classes: list[str]) -> dict[str, Any]:
    """labels (N,), probs (N, K) -> accuracy, errors, n, log_loss, per_class and macro / weighted averages.

    Predictions are argmax(probs) (first index on ties, as torch and numpy do). Precision, recall and F1 are
    0.0 where undefined (a class never predicted, or with no support), and the macro averages run over all K
    classes, such classes included: scikit-learn's `labels=range(K), zero_division=0`. log_loss is the mean
    -log p(true class) with probs clipped to [eps, 1 - eps], eps the machine epsilon of probs' dtype (as
    sklearn.metrics.log_loss does).
    """
    y, p = _labels_probs(labels, probs, classes)
    n, k = p.shape
    preds = p.argmax(1)
    cm = np.bincount(y * k + preds, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # 2 tp / (2 tp + fp + fn): defined even where p + r = 0
    eps = np.finfo(p.dtype).eps
    p_true = np.clip(p[np.arange(n), y], eps, 1 - eps).astype(np.float64)
    correct = int(tp.sum())
    return {
        "n": n,
        "accuracy": correct / n,  # a ratio of counts, not a float32 mean
        "errors": n - correct,
        "log_loss": float(-np.log(p_true).mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / n),
        "per_class": [
            {"class": classes[i], "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i])}
            for i in range(k)
        ],
    }  # fmt: skip


def _check_cm(cm: ArrayLike, classes: list[str] | None = None) -> np.ndarray:
    c = _numpy(cm)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise ValueError(f"confusion matrix must be (K, K) with K >= 1, rows = true class; got shape {c.shape}")
    if classes is not None and len(classes) != c.shape[0]:
        raise ValueError(f"got {len(classes)} class names for a {c.shape[0]}x{c.shape[0]} confusion matrix")
    if (c < 0).any():
        raise ValueError("confusion matrix must hold non-negative counts")
    return c


def confusion_percent(cm: ArrayLike) -> np.ndarray:
    """(K, K) counts -> (K, K) float64 percentages of each row (true class); a row with no examples stays 0."""
    c = _check_cm(cm).astype(np.float64)
    rows = c.sum(1, keepdims=True)
    return np.divide(100 * c, rows, out=np.zeros(c.shape), where=rows > 0)


def top_confusions(cm: ArrayLike, classes: list[str], k: int = 10) -> list[dict[str, Any]]:
    """The k largest off-diagonal cells of cm (K, K) with a non-zero count, as
    {true, predicted (class names), count, percent_of_true}. Order: count, then percent_of_true (the same count
    out of a smaller class is worse), both descending, then true and predicted class index ascending."""
    c = _check_cm(cm, classes)
    pct = confusion_percent(c)
    cells = [(int(i), int(j)) for i, j in np.argwhere(c) if i != j]
    cells.sort(key=lambda ij: (-c[ij], -pct[ij], ij[0], ij[1]))
    return [
        {"true": classes[i], "predicted": classes[j], "count": int(c[i, j]), "percent_of_true": float(pct[i, j])}
        for i, j in cells[:k]
    ]


# ------------------------------------------------------------------------------------------ calibration
def calibration(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, Any]:
    """Reliability of the confidence max(probs (N, K)) against labels (N,), in `bins` equal-width bins.

    Bin b covers (lo, hi] = (b / bins, (b + 1) / bins]; the first bin also takes a confidence of exactly 0.
    Edges are compared in float64 (a float32 0.2 is slightly above 0.2, so it falls in the bin above).
    Returns ece = sum over bins of count / N * |accuracy - confidence|, mce = the largest such gap over
    non-empty bins, and every bin as {lo, hi, count, confidence (mean), accuracy}; empty bins report 0.0.
    """
    if bins < 1:
        raise ValueError(f"bins = {bins}: expected a positive number of bins")
    y, p = _labels_probs(labels, probs)
    conf = p.max(1).astype(np.float64)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.arange(bins + 1) / bins  # each edge the float nearest b / bins, so 0.4 is exactly the literal 0.4
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(b, minlength=bins)
    mean_conf = _ratio(np.bincount(b, weights=conf, minlength=bins), count)
    acc = _ratio(np.bincount(b, weights=correct, minlength=bins), count)
    gap = np.abs(acc - mean_conf)
    return {
        "ece": float((count * gap).sum() / len(y)),
        "mce": float(gap[count > 0].max()),
        "bins": [
            {"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": int(count[i]),
             "confidence": float(mean_conf[i]), "accuracy": float(acc[i])}
            for i in range(bins)
        ],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ errors
def error_groups(labels: ArrayLike, probs: ArrayLike) -> list[dict[str, Any]]:
    """Every misclassified example of labels (N,), probs (N, K), grouped by (true, predicted) class index:
    [{true, predicted, count, indices, confidences}], confidences = the probability of the wrong prediction.

    Groups are sorted by count descending, then (true, predicted) ascending; within a group the most confident
    error comes first (ties: lower index first).
    """
    y, p = _labels_probs(labels, probs)
    preds = p.argmax(1)
    wrong = np.flatnonzero(preds != y)
    conf = p[wrong, preds[wrong]].astype(np.float64)
    order = np.lexsort((wrong, -conf))  # last key is primary: confidence descending, then index
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for i in order:
        key = (int(y[wrong[i]]), int(preds[wrong[i]]))
        g = groups.setdefault(key, {"true": key[0], "predicted": key[1], "count": 0, "indices": [], "confidences": []})
        g["count"] += 1
        g["indices"].append(int(wrong[i]))
        g["confidences"].append(float(conf[i]))
    return sorted(groups.values(), key=lambda g: (-g["count"], g["true"], g["predicted"]))


# ------------------------------------------------------------------------------------------ slices
def slice_report(
    labels: ArrayLike,
    probs: ArrayLike,
    slices: dict[str, ArrayLike],
    classes: list[str],
    bins: int = 15,
    z_flag: float = 2.0,
) -> dict[str, Any]:
    """classification_metrics plus the calibration `ece` for each named slice (an index tensor or boolean mask
    into labels (N,) / probs (N, K)), and `gap`: one entry per pair of slices, in the order given.

    Each gap is {a, b, n_a, n_b, accuracy_a, accuracy_b, difference_pp (a - b), z, p_value, flagged}: a
    two-proportion z-test with the pooled proportion, z = (acc_a - acc_b) / sqrt(q (1 - q) (1/n_a + 1/n_b)),
    q = all correct / all examples (z = 0 when both slices are all right or all wrong). `flagged` is |z| > z_flag
    (default 2, a two-sided p of about 0.046): the difference is unlikely to be sampling noise. The test assumes
    the slices are disjoint.
    """
    y, p = _labels_probs(labels, probs, classes)
    if "gap" in slices:
        raise ValueError("a slice may not be named 'gap': that key holds the pairwise comparisons")
    out: dict[str, Any] = {}
    for name, index in slices.items():
        idx = _numpy(index)
        if idx.dtype == np.bool_:
            if idx.shape != y.shape:
                raise ValueError(f"slice {name!r}: a boolean mask must have shape {y.shape}; got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"slice {name!r}: expected a non-empty 1-D index tensor or boolean mask")
        if idx.min() < 0 or idx.max() >= len(y):
            raise ValueError(f"slice {name!r}: indices must be in [0, {len(y)}); got {idx.min()}..{idx.max()}")
        out[name] = {
            **classification_metrics(y[idx], p[idx], classes),
            "ece": calibration(p[idx], y[idx], bins)["ece"],
        }
    gaps = []
    for a, b in combinations(slices, 2):
        n_a, n_b = out[a]["n"], out[b]["n"]
        acc_a, acc_b = out[a]["accuracy"], out[b]["accuracy"]
        q = (acc_a * n_a + acc_b * n_b) / (n_a + n_b)
        se = math.sqrt(q * (1 - q) * (1 / n_a + 1 / n_b))
        z = (acc_a - acc_b) / se if se > 0 else 0.0
        gaps.append({
            "a": a, "b": b, "n_a": n_a, "n_b": n_b, "accuracy_a": acc_a, "accuracy_b": acc_b,
            "difference_pp": 100 * (acc_a - acc_b), "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2)),
            "flagged": abs(z) > z_flag,
        })  # fmt: skip
    out["gap"] = gaps
    return out


# ------------------------------------------------------------------------------------------ diagnosis
def diagnose(
    history: list[dict[str, float]],
    val_accuracy: float | None = None,
    *,
    underfit_below: float = 0.97,
    overfit_gap_pp: float = 1.0,
    rising_epochs: int = 3,
    improving_drop: float = 0.02,
) -> dict[str, Any]:
    """What a run's metrics.csv rows (epoch, train_loss, train_acc, val_loss, val_acc, lr, ...) say about it:
    {verdict, reasons, next_steps}, reasons quoting the numbers. Checked in this order, the first that holds
    is the verdict (the others still add their reasons):

    - "overfitting": train accuracy more than `overfit_gap_pp` (default 1.0 pp) above validation at the last
      epoch, or val loss rising for each of the last `rising_epochs` (default 3) epochs while train loss fell.
    - "underfitting": the best train accuracy and the held-out accuracy both below `underfit_below` (default
      0.97, far below what any sensible model reaches on a 10-class digit task; lower it for harder data).
    - "still-improving": val loss fell by at least `improving_drop` (default 2%, relative) in the last epoch to
      its lowest value: more epochs would help. A single epoch counts as still improving.
    - "converged": none of the above.

    `val_accuracy` is the kept checkpoint's accuracy as evaluated; without it the best val_acc in the history
    stands in. Train accuracy is averaged during the epoch on augmented batches (with label smoothing in the
    loss), so it sitting below validation is normal and never counts against the run; the reasons say so.
    """
    if not history:
        raise ValueError("diagnose needs at least one metrics.csv row (epoch, train_loss, train_acc, val_loss, ...)")
    rows = sorted(history, key=lambda r: float(r["epoch"]))
    col = {k: [float(r[k]) for r in rows] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")}
    for k in ("train_acc", "val_acc"):
        if max(col[k]) > 1 + 1e-9:
            raise ValueError(f"{k} goes up to {max(col[k]):g}; accuracies must be fractions in [0, 1]")
    epochs = [int(e) for e in col["epoch"]]
    if not any(math.isfinite(v) for v in col["val_loss"]):
        return _diagnose_without_validation(epochs, col["train_acc"], underfit_below)
    e, train_acc, val_acc = epochs[-1], col["train_acc"][-1], col["val_acc"][-1]
    val_loss, train_loss = col["val_loss"], col["train_loss"]
    best = int(np.argmin(val_loss))
    held_out = val_accuracy if val_accuracy is not None else max(col["val_acc"])
    held_name = "held-out accuracy" if val_accuracy is not None else "best validation accuracy"
    lrs = [float(r["lr"]) for r in rows if "lr" in r]
    found: dict[str, list[str]] = {}

    gap_pp = 100 * (train_acc - val_acc)
    if gap_pp > overfit_gap_pp:
        found.setdefault("overfitting", []).append(
            f"train {_pct(train_acc)} vs validation {_pct(val_acc)} (gap {gap_pp:.1f} pp) at epoch {e}, above the "
            f"{overfit_gap_pp:g} pp threshold (and train accuracy is the harder, in-epoch measure)"
        )
    if len(rows) > rising_epochs >= 1:
        w = slice(-rising_epochs - 1, None)
        v, t = val_loss[w], train_loss[w]
        if (np.diff(v) > 0).all() and t[-1] < t[0]:
            found.setdefault("overfitting", []).append(
                f"val loss rose for {rising_epochs} epochs in a row ({v[0]:.4f} at epoch {epochs[-rising_epochs - 1]}"
                f" -> {v[-1]:.4f} at epoch {e}) while train loss fell ({t[0]:.4f} -> {t[-1]:.4f})"
            )
    if max(col["train_acc"]) < underfit_below and held_out < underfit_below:
        found["underfitting"] = [
            f"best train accuracy {_pct(max(col['train_acc']))} and {held_name} {_pct(held_out)} are both below "
            f"{_pct(underfit_below)}: the model does not fit even the training data"
        ]
    if len(rows) == 1:
        found["still-improving"] = [f"only 1 epoch was trained (val loss {val_loss[0]:.4f}): too short to level off"]
    else:
        prev, last = val_loss[-2], val_loss[-1]
        drop = (prev - last) / prev if prev > 0 else 0.0
        if drop >= improving_drop and best == len(rows) - 1:
            reason = (f"val loss still fell {100 * drop:.1f}% in the last epoch ({prev:.4f} -> {last:.4f} at epoch "
                      f"{e}), its lowest so far")  # fmt: skip
            if lrs and max(lrs) > 0 and lrs[-1] < 0.1 * max(lrs):
                reason += f"; the lr had annealed to {lrs[-1]:.3g} (peak {max(lrs):.3g}), part of the drop is that"
            found["still-improving"] = [reason]

    verdict = next((v for v in ("overfitting", "underfitting", "still-improving") if v in found), "converged")
    if verdict == "converged":
        spread = 100 * (val_loss[-1] - val_loss[best]) / val_loss[best] if val_loss[best] > 0 else 0.0
        found["converged"] = [
            f"val loss {val_loss[-1]:.4f} at epoch {e} is within {spread:.1f}% of its best {val_loss[best]:.4f} "
            f"(epoch {epochs[best]}) and no longer falling by {100 * improving_drop:g}% an epoch; "
            f"validation accuracy {_pct(val_acc)} (best {_pct(max(col['val_acc']))})"
        ]
    reasons = found[verdict] + [r for v, rs in found.items() if v != verdict for r in rs]
    if train_acc < val_acc:
        reasons.append(
            f"train {_pct(train_acc)} is below validation {_pct(val_acc)} at epoch {e}: normal, not a problem; train "
            "accuracy is averaged over the epoch while the weights still change, on augmented batches when "
            "augmentation is on, with any dropout active and any label smoothing in the loss"
        )
    return {"verdict": verdict, "reasons": reasons, "next_steps": _next_steps(verdict, epochs[best], len(rows), lrs)}


def _diagnose_without_validation(epochs: list[int], train_acc: list[float], underfit_below: float) -> dict[str, Any]:
    """A run with no validation (data.val_fraction 0): only an underfit shows in its training curve."""
    best = max(train_acc)
    reason = (f"no validation curve: the run trained on every training image (data.val_fraction 0), so over- or "
              f"under-training cannot be told from its metrics; train accuracy {_pct(train_acc[-1])} at epoch "
              f"{epochs[-1]} (in-epoch, on augmented batches)")  # fmt: skip
    if best < underfit_below:
        return {"verdict": "underfitting",
                "reasons": [f"best train accuracy {_pct(best)} is below {_pct(underfit_below)}: the model does not fit "
                            "even the training data", reason],
                "next_steps": _next_steps("underfitting", epochs[-1], len(epochs), [])}  # fmt: skip
    return {"verdict": "no-validation", "reasons": [reason],
            "next_steps": ["diagnose the recipe on a run with a hold-out (data.val_fraction=0.1), then refit on "
                           "every training image once it is fixed"]}  # fmt: skip


def _next_steps(verdict: str, best_epoch: int, n_epochs: int, lrs: list[float]) -> list[str]:
    if verdict == "overfitting":
        return [
            "stronger augmentation (recipe standard -> combinatorial) or more weight decay (train.weight_decay)",
            f"keep the checkpoint chosen on validation (lowest val loss at epoch {best_epoch}); early stopping "
            "(train.early_stopping_patience_epochs) saves the epochs after it",
            "more dropout (model.args.dropout) or a smaller model",
        ]
    if verdict == "underfitting":
        lr = f" (last lr {lrs[-1]:.3g})" if lrs else ""
        return [
            "more epochs or a larger model (cnn3)",
            f"check the learning rate{lr}: too low learns slowly, too high never settles",
            "lighter augmentation (recipe -> mild) or less weight decay, if even train accuracy stays low",
        ]
    if verdict == "still-improving":
        return [
            f"more epochs (train.epochs; this run had {n_epochs}): val loss was still falling",
            "rerun with the larger budget rather than resuming, so the lr schedule spans all epochs",
        ]
    return [
        "this recipe has levelled off: further gains need a different one (a larger model, stronger augmentation "
        "with more epochs, or an ensemble of seeds)",
        "compare recipes as mean +- std over several seeds; single-run differences of ~0.1 pp are noise",
    ]


# ------------------------------------------------------------------------------------------ robustness
def summarize_robustness(results: dict[str, float]) -> dict[str, Any]:
    """{name: accuracy} (e.g. one per corruption) -> {n, mean, worst, worst_accuracy, best, best_accuracy}.
    Ties go to the name that sorts first."""
    if not results:
        raise ValueError("summarize_robustness got no results; expected {test set name: accuracy}")
    items = sorted((float(acc), name) for name, acc in results.items())
    worst = items[0]
    best = min(items, key=lambda x: (-x[0], x[1]))
    return {
        "n": len(items),
        "mean": sum(acc for acc, _ in items) / len(items),
        "worst": worst[1],
        "worst_accuracy": worst[0],
        "best": best[1],
        "best_accuracy": best[0],
    }
