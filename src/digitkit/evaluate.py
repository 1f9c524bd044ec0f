"""Metrics in, numbers out: predictions, accuracy, confusion, and the full evaluation behind `digitkit evaluate`
(per-class metrics, calibration, rejection trade-off, robustness to augmentation, corruptions and attacks,
slices, diagnosis). Nothing here writes files or prints; report.py does."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """images (N, 1, H, W), uint8 or float in [0, 1] -> logits (N, K) float32 on the CPU, in eval mode, batch by
    batch."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _in_batches(model, images, batch_size, device, lambda x: model(x.contiguous(memory_format=fmt)))


def _in_batches(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str,
                forward: Any) -> torch.Tensor:  # fmt: skip
    """forward(x) over images in batches, x float in [0, 1] on `device`, model in eval mode; results on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for chunk in images.split(batch_size):
            x = chunk.to(device, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            out.append(forward(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in [0, 1]. With label_smoothing = 0 the loss is the plain log loss."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing).item()
    acc = (logits.argmax(1) == labels).sum().item() / max(len(labels), 1)  # exact, not a float32 mean
    return loss, acc


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts; rows are true classes, columns predicted ones."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    noise_sigma: float = 0.0,
    noise_samples: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
) -> torch.Tensor:
    """images (N, 1, H, W) uint8 or float in [0, 1] -> probabilities (N, K), as the model answers in use.

    With `noise_sigma` > 0 this is the inference-time Gaussian-noise defence: the mean softmax over
    `noise_samples` noisy copies. The noise set is drawn once from `seed` and shared by every image, so an
    image's answer depends on nothing else in the batch (the CLI, a server's cache and evaluate all agree).
    `temperature` divides the logits before each softmax (the run's calibration, digitkit.calibration).
    """
    if noise_sigma <= 0:
        return predict_logits(model, images, batch_size, device).div(temperature).softmax(1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((noise_samples, *images.shape[1:]), generator=g).to(device)

    def mean_softmax(x: torch.Tensor) -> torch.Tensor:
        return sum(model((x + noise_sigma * n).clamp_(0, 1)).float().div(temperature).softmax(1)
                   for n in noise) / noise_samples  # fmt: skip

    return _in_batches(model, images, batch_size, device, mean_softmax)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (..., H, W) moved down by dy and right by dx pixels (negative: up, left), zeros shifted in."""
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"a shift of ({dy}, {dx}) px leaves nothing of a {h}x{w} image")
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@torch.no_grad()
def predict_probs_shift_tta(
    model: nn.Module,
    images: torch.Tensor,
    pixels: int = 1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Test-time augmentation by small translations: the mean softmax over the image and its copies shifted by
    `pixels` left, right, up and down (5 views). images (N, 1, H, W) uint8 or float in [0, 1] -> (N, K)."""
    if pixels < 1:
        raise ValueError(f"pixels = {pixels}: expected a shift of at least 1 px")
    offsets = [(0, 0), (pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def mean_softmax(x: torch.Tensor) -> torch.Tensor:
        views = [model(shift(x, dy, dx).contiguous(memory_format=fmt)).float().softmax(1) for dy, dx in offsets]
        return sum(views) / len(views)

    return _in_batches(model, images, batch_size, device, mean_softmax)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact share of rows whose top class is the label."""
    return int((probs.argmax(1) == labels).sum()) / max(len(labels), 1)


SCORE_FLOOR = 1e-30
"""Probabilities are floored here before the log in digit_scores: a float32 softmax underflows to 0 for classes far
below the top one, and those only make a score (already far above any threshold) a little lower than exact."""


def digit_scores(probs: torch.Tensor) -> torch.Tensor:
    """probs (N, K) -> (N,): the mean over the classes of log(p_top / p_i), 0 when all classes are alike (what
    outlier exposure teaches a model to answer for a non-digit), larger the more one class stands out. Taken from
    probabilities, not logits, so an ONNX export (whose graph ends in the softmax) scores alike; it equals
    (top logit - mean logit) / T. inference.reject_below_digit_score rejects below it."""
    logp = probs.float().clamp_min(SCORE_FLOOR).log()
    return logp.amax(1) - logp.mean(1)


def rejection_curve(probs: torch.Tensor, labels: torch.Tensor, thresholds: tuple[float, ...] | None = None,
                    digit_score: float = 0.0) -> list:  # fmt: skip
    """What a confidence threshold trades: for each threshold, the share of images answered (coverage), the
    accuracy on those answered, and the errors and correct answers it turns into rejections. `digit_score`: a
    digit-score threshold applied too (an image below it is rejected whatever its confidence)."""
    thresholds = thresholds or (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    conf, preds = probs.max(1)
    scored = digit_scores(probs) >= digit_score if digit_score > 0 else torch.ones_like(conf, dtype=torch.bool)
    correct = preds == labels
    n = max(len(labels), 1)
    rows = []
    for t in thresholds:
        answered = (conf >= t) & scored
        n_ans = int(answered.sum())
        rows.append({
            "threshold": t,
            **({"digit_score": digit_score} if digit_score > 0 else {}),
            "coverage": n_ans / n,
            "accuracy_answered": int((correct & answered).sum()) / max(n_ans, 1),
            "errors_answered": int((~correct & answered).sum()),
            "errors_rejected": int((~correct & ~answered).sum()),
            "correct_rejected": int((correct & ~answered).sum()),
        })  # fmt: skip
    return rows


def temperature_scaling(raw: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, classes: list[str],
                        temperature: float, results: dict[str, Any], bins: int = 15) -> dict[str, Any]:  # fmt: skip
    """ECE and log loss of the raw softmax (T = 1, `raw` (N, K)) against the calibrated `probs` (N, K), whose
    figures are already in `results`; and the share of images whose top class is the same (1.0 without the noise
    defence: dividing logits by T never changes their argmax)."""
    from digitkit import metrics

    before = metrics.calibration(raw, labels, bins=bins)
    return {
        "temperature": temperature,
        "ece_before": before["ece"],
        "ece_after": results["calibration"]["ece"],
        "mce_before": before["mce"],
        "mce_after": results["calibration"]["mce"],
        "log_loss_before": metrics.classification_metrics(labels, raw, classes)["log_loss"],
        "log_loss_after": results["log_loss"],
        "accuracy_before": accuracy(raw, labels),
        "same_predictions": float((raw.argmax(1) == probs.argmax(1)).float().mean()),
    }


# ------------------------------------------------------------------------------------------- full evaluation
@dataclass
class EvalOptions:
    """What `digitkit evaluate` measures beyond the clean metrics, and how much it spends on it."""

    corruptions: bool = True
    """Accuracy on each corruption of the suite (modelled on MNIST-C) and their mean."""
    augmented: bool = True
    """Accuracy on an augmented copy (the run's training recipe; `standard` if it trained without one)."""
    adversarial: bool = True
    adversarial_n: int = 500
    """Images attacked (a seeded stratified sample): PGD costs steps x forward and backward passes per image,
    times the defence's samples for the adaptive attack on the defended model."""
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    """L-infinity budgets in pixel units ([0, 1])."""
    pgd_steps: int = 10
    defence_sigma: float = 0.05
    """Noise defence evaluated beside the undefended model when the run's config has it off. Small on purpose:
    a model trained without noise loses most of its clean accuracy at sigma 0.15 (measured on the default
    model: 99.3% at 0.05, 89.6% at 0.1, 37% at 0.15); larger sigmas need training with augment.noise."""
    defence_samples: int = 4
    calibration_bins: int = 15
    seed: int = 0
    """Seeds the corrupted and augmented copies, the attacks and the defence's noise: reruns are identical."""


@dataclass
class Evaluation:
    results: dict[str, Any]
    """Everything as JSON-ready data (metrics.json)."""
    probs: torch.Tensor
    """(N, K) probabilities as the model answers in use (noise defence included if the config has it on)."""
    confusion: torch.Tensor
    groups: list[dict[str, Any]] = field(default_factory=list)


ProgressFn = Callable[[str, float, float], None]
"""Called as (stage starting, work done, work in all) before each stage and ("done", all, all) at the end."""


def work_plan(n: int, opts: EvalOptions, sigma: float, samples: int) -> dict[str, float]:
    """Each stage's cost in forward passes over one image (a backward pass counted as two), so a progress bar's
    ETA weighs the attacks, which take most of a full evaluation, by what they really cost."""
    from digitkit.corruptions import CORRUPTIONS

    one_pass = n * (samples if sigma > 0 else 1)
    plan = {"clean": float(one_pass)}
    if opts.augmented:
        plan["augmented copy"] = float(one_pass)
    if opts.corruptions:
        plan.update({f"corruption {name}": float(one_pass) for name in CORRUPTIONS})
    if opts.adversarial and opts.adversarial_n > 0:
        noise_samples = samples if sigma > 0 else opts.defence_samples
        per_eps = (3 + 1) + (3 * opts.pgd_steps + 1)  # FGSM and PGD (forward + backward per step), then the answer
        plan["attacks"] = float(min(opts.adversarial_n, n) * len(opts.epsilons) * per_eps * (1 + noise_samples))
    return plan


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    opts: EvalOptions,
    inference: Any = None,
    augment_cfg: Any = None,
    history: list[dict[str, float]] | None = None,
    slices: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    temperature: float = 1.0,
) -> Evaluation:
    """Measure a model on (images (N, 1, H, W) uint8, labels (N,)): no files, no printing (report.py writes).

    `inference` is the run's InferenceConfig (noise defence, rejection threshold); `augment_cfg` its training
    recipe; `history` its metrics.csv rows (for the diagnosis); `slices` named index sets (MNIST's two writer
    populations); `progress` hears of each stage (see ProgressFn and work_plan); `temperature` the run's
    calibration (digitkit.calibration): every probability is softmax(logits / temperature), as the model
    answers in use, and `temperature_scaling` compares the calibration with the raw softmax (T = 1).
    """
    from digitkit import metrics

    started = time.perf_counter()
    model.eval().to(device)
    sigma = float(getattr(inference, "noise_defence_sigma", 0.0))
    samples = int(getattr(inference, "noise_defence_samples", 8))
    plan = work_plan(len(labels), opts, sigma, samples)
    total, done = sum(plan.values()), 0.0

    def stage(name: str) -> None:
        nonlocal done
        if progress is not None:
            progress(name, done, total)
        done += plan[name]

    stage("clean")
    if sigma > 0:
        probs = predict_probs(model, images, sigma, samples, opts.seed, device=device, temperature=temperature)
        raw = probs if temperature == 1 else predict_probs(model, images, sigma, samples, opts.seed, device=device)
    else:  # one forward pass gives both the calibrated and the raw probabilities
        logits = predict_logits(model, images, device=device)
        probs, raw = logits.div(temperature).softmax(1), logits.softmax(1)
    preds = probs.argmax(1)
    cm = confusion_matrix(labels, preds, len(classes))
    groups = metrics.error_groups(labels, probs)
    results: dict[str, Any] = {
        "n": len(labels),
        "noise_defence_sigma": sigma,
        **metrics.classification_metrics(labels, probs, classes),
        "top_confusions": metrics.top_confusions(cm, classes, k=10),
        "error_groups": [{k: g[k] for k in ("true", "predicted", "count")} for g in groups],
        "calibration": metrics.calibration(probs, labels, bins=opts.calibration_bins),
        "rejection": rejection_curve(probs, labels),
    }
    results["temperature_scaling"] = temperature_scaling(raw, probs, labels, classes, temperature,
                                                         results, opts.calibration_bins)  # fmt: skip
    threshold = float(getattr(inference, "reject_below_confidence", 0.0))
    if inference is not None:
        score = float(getattr(inference, "reject_below_digit_score", 0.0))
        row = rejection_curve(probs, labels, (threshold,), score)[0]
        results["rejection_at_config"] = row
    if slices:
        results["slices"] = metrics.slice_report(labels, probs, slices, classes)
    if history:
        results["diagnosis"] = metrics.diagnose(history, results["accuracy"])
    robust: dict[str, float] = {"clean": results["accuracy"]}
    if opts.augmented:
        from digitkit import augment

        cfg = augment_cfg if augment_cfg is not None and augment_cfg.enabled else augment.load_recipe("standard")
        stage("augmented copy")
        x_aug = augment.augmented_copy(images, cfg, opts.seed)
        probs_aug = predict_probs(model, x_aug, sigma, samples, opts.seed, device=device, temperature=temperature)
        robust["augmented"] = accuracy(probs_aug, labels)
        results["augmented_recipe"] = "the run's training recipe" if cfg is augment_cfg else "standard"
    if opts.corruptions:
        from digitkit.corruptions import CORRUPTIONS, corrupt

        for name in CORRUPTIONS:
            stage(f"corruption {name}")
            x_c = corrupt(images, name, seed=opts.seed)
            probs_c = predict_probs(model, x_c, sigma, samples, opts.seed, device=device, temperature=temperature)
            robust[name] = accuracy(probs_c, labels)
        results["corruption_summary"] = metrics.summarize_robustness({k: robust[k] for k in CORRUPTIONS})
    results["robustness"] = robust
    if opts.adversarial and opts.adversarial_n > 0:
        from digitkit.adversarial import robustness_curves
        from digitkit.data import stratified_split

        n = min(opts.adversarial_n, len(labels))
        # A seeded, class-stratified sample: the held-out side of a stratified split.
        idx = torch.arange(len(labels)) if n == len(labels) else stratified_split(labels, n / len(labels), opts.seed)[1]
        defence, defence_samples = (sigma, samples) if sigma > 0 else (opts.defence_sigma, opts.defence_samples)
        stage("attacks")
        model.cpu()
        results["adversarial"] = robustness_curves(
            model, images[idx], labels[idx], epsilons=opts.epsilons, attacks=("fgsm", "pgd"),
            defence_sigma=defence, defence_samples=defence_samples, pgd_steps=opts.pgd_steps,
            seed=opts.seed,
        )  # fmt: skip
        model.to(device)
    results["seconds"] = round(time.perf_counter() - started, 2)
    if progress is not None:
        progress("done", total, total)
    return Evaluation(results=results, probs=probs, confusion=cm, groups=groups)

