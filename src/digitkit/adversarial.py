"""L-infinity attacks (FGSM, PGD), the inference-time Gaussian-noise defence, and robustness curves.

Everything is in pixel space: x (B, C, H, W) in [0, 1], budgets `eps` in the same units, adversarial images
clamped to [0, 1]. The attacks are untargeted (they raise the cross-entropy of the true label) and run the
model in eval mode, so batch norm's running statistics never move; every submodule's train/eval flag is
restored afterwards. Gradients are taken with `torch.autograd.grad` on the input only: no parameter `.grad`.

The noise defence answers with the mean softmax over noisy copies of the input. Attacking it with the plain
model's gradient would overstate it (gradient masking), so with `defence_sigma` > 0 the attacks are adaptive:
they follow the expectation over the defence's noise of the loss (EOT, Athalye et al. 2018), estimated with
`defence_samples` draws at every step. Pure: no files, no printing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from digitkit.errors import ConfigError
from digitkit.explain import eval_mode

ATTACKS = ("fgsm", "pgd")


@torch.no_grad()
def noisy_probs(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    samples: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x (B, C, H, W) in [0, 1] -> probs (B, K): the mean softmax over `samples` copies of x plus N(0, sigma^2)
    noise, clamped to [0, 1]. sigma = 0 is the plain softmax (no noise drawn)."""
    _check_defence(sigma, samples)
    with eval_mode(model):
        if sigma <= 0:
            return model(x).float().softmax(1)
        total = None
        for _ in range(samples):
            probs = model(_noisy(x, sigma, generator)).float().softmax(1)
            total = probs if total is None else total + probs
    return total / samples


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    defence_sigma: float = 0.0,
    defence_samples: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One signed-gradient step of size eps: x_adv = clamp(x + eps * sign(d loss / dx), 0, 1).

    With defence_sigma > 0 the gradient is the EOT estimate over the noise defence (`generator` seeds it).
    """
    _check_eps(eps)
    x = x.detach()
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        grad = _loss_grad(model, x, y, defence_sigma, defence_samples, generator)
    return (x + eps * grad.sign()).clamp(0, 1)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    *,
    defence_sigma: float = 0.0,
    defence_samples: int = 8,
) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball of radius eps around x (Madry et al. 2018).

    Starts at a uniform random point of the ball (`random_start`, seeded by `generator`), then `steps` times:
    x_adv += alpha * sign(grad), projected back into the ball and into [0, 1]. alpha defaults to 2.5 * eps /
    steps, so the walk can cross the ball. Returns the last iterate. With defence_sigma > 0 each step uses the
    EOT gradient over the noise defence.
    """
    _check_eps(eps)
    if steps < 1:
        raise ConfigError(f"pgd needs steps >= 1; got {steps}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    x_adv = x.clone()
    if random_start:
        start = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = (x + eps * (2 * start - 1)).clamp(0, 1)
    with eval_mode(model):
        for _ in range(steps):
            grad = _loss_grad(model, x_adv, y, defence_sigma, defence_samples, generator)
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def robustness_curves(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3),
    attacks: tuple[str, ...] = ATTACKS,
    defence_sigma: float = 0.0,
    defence_samples: int = 8,
    pgd_steps: int = 10,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy under each attack at each budget; images (N, C, H, W) uint8, labels (N,). JSON-ready.

    Returns {"epsilons": [...], "curves": {attack: [accuracy per eps]}, "n", "clean_accuracy",
    "clean_accuracy_defended", ...}. With defence_sigma > 0 the curves also hold
    "<attack> + noise defence (sigma=<s>)": the adaptive (EOT) attack on the defended model, scored with the
    defence's own noisy answer. Every (attack, eps) run reseeds its noise from `seed`, so results are
    reproducible and eps = 0 reproduces the clean accuracies exactly.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ConfigError(
            f"unknown attack {unknown[0] if unknown else '(none)'!r}; expected some of: {', '.join(ATTACKS)}"
        )
    for eps in epsilons:
        _check_eps(eps)
    _check_defence(defence_sigma, defence_samples)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be (N,) = ({len(images)},); got {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    device = next(model.parameters()).device
    batches = [
        (xb.to(device).float().div(255), yb.to(device).long())
        for xb, yb in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    ]
    n = len(labels)
    defended = defence_sigma > 0

    def accuracy(attack: str | None, eps: float, sigma: float) -> float:
        g_attack = torch.Generator().manual_seed(seed)
        g_defence = torch.Generator().manual_seed(seed + 1)  # the defence's own noise, fresh for every run
        correct = 0
        for x, y in batches:
            if attack == "fgsm":
                x = fgsm(model, x, y, eps, defence_sigma=sigma, defence_samples=defence_samples, generator=g_attack)
            elif attack == "pgd":
                x = pgd(model, x, y, eps, steps=pgd_steps, generator=g_attack, defence_sigma=sigma,
                        defence_samples=defence_samples)  # fmt: skip
            probs = noisy_probs(model, x, sigma, defence_samples, g_defence)
            correct += int((probs.argmax(1) == y).sum())
        return correct / max(n, 1)

    with eval_mode(model):
        clean = accuracy(None, 0.0, 0.0)
        clean_defended = accuracy(None, 0.0, defence_sigma) if defended else clean
        curves: dict[str, list[float]] = {}
        for attack in attacks:
            curves[attack] = [accuracy(attack, eps, 0.0) for eps in epsilons]
        if defended:
            for attack in attacks:
                name = f"{attack} + noise defence (sigma={defence_sigma:g})"
                curves[name] = [accuracy(attack, eps, defence_sigma) for eps in epsilons]
    return {
        "epsilons": [float(e) for e in epsilons],
        "curves": curves,
        "n": n,
        "clean_accuracy": clean,
        "clean_accuracy_defended": clean_defended,
        "pgd_steps": pgd_steps,
        "defence_sigma": float(defence_sigma),
        "defence_samples": defence_samples if defended else 0,
        "seed": seed,
    }


# ----------------------------------------------------------------------------------------------- internals


def _noisy(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same noise on any device.
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + sigma * noise).clamp(0, 1)


def _loss_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    defence_sigma: float,
    defence_samples: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """d loss / dx (B, C, H, W), loss = summed cross-entropy of the true labels (summed, not averaged: each
    image gets its own gradient). With the defence on, the mean of that over `defence_samples` noisy copies,
    differentiated through the noise and the clamp exactly as the defence applies them (EOT)."""
    _check_defence(defence_sigma, defence_samples)
    draws = defence_samples if defence_sigma > 0 else 1
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        total = torch.zeros_like(x)
        for _ in range(draws):  # one batch per draw keeps memory at one batch's activations
            seen = _noisy(x, defence_sigma, generator) if defence_sigma > 0 else x
            loss = F.cross_entropy(model(seen).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            total += grad
    return total / draws


def _check_eps(eps: float) -> None:
    if not 0 <= eps <= 1:
        raise ConfigError(f"attack budget eps = {eps}: expected an L-infinity radius in pixel units, 0 <= eps <= 1")


def _check_defence(sigma: float, samples: int) -> None:
    if sigma < 0 or (sigma > 0 and samples < 1):
        raise ConfigError(
            f"noise defence sigma = {sigma}, samples = {samples}: expected sigma >= 0 (0 = off) and samples >= 1"
        )
