"""Which pixels made the model answer what it did: saliency, SmoothGrad, integrated gradients and Grad-CAM.

Every method takes images the way models take them, (B, C, H, W) floats in [0, 1], and returns one map per
image, (B, H, W) in [0, 1]. Gradients are taken with `torch.autograd.grad` with respect to the input (or the
feature map), never with `.backward()`, so the model's parameters never receive a `.grad`; the model runs in
eval mode (batch norm uses its running statistics, no dropout) and gets its own train/eval flags back after.
Pure: no files, no printing. plots.save_explanation draws the maps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digitkit.errors import ConfigError

METHODS = ("saliency", "smoothgrad", "integrated-gradients", "gradcam")
MAX_BATCH = 512  # images per forward pass when a method multiplies the batch (integrated gradients)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block in eval mode and give every submodule its own train/eval flag back, even on error.

    Per submodule because a caller may have frozen parts (e.g. batch norm in eval inside a training model):
    `model.train(was_training)` would overwrite that.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def attribute(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: torch.Tensor | None = None,
    *,
    samples: int = 25,
    noise: float = 0.15,
    steps: int = 32,
    generator: torch.Generator | None = None,
    model_name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) in [0, 1] -> (maps (B, H, W) in [0, 1], probs (B, K) softmax of the plain model output).

    `target` (B,) class indices whose logit is explained; None explains the predicted class. Each map is
    min-max normalized on its own (a constant map becomes zeros). `samples` and `noise` (pixel std, [0, 1]
    units) are SmoothGrad's, `steps` integrated gradients'; `generator` seeds SmoothGrad's noise.
    `model_name` only makes Grad-CAM's error message name the model.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; expected one of: {', '.join(METHODS)}")
    x = _check_input(x)
    with eval_mode(model):
        if method == "gradcam":
            raw, probs = _gradcam(model, x, target, model_name)
        else:
            with torch.no_grad():
                probs = model(x).float().softmax(1)
            target = _resolve_target(target, probs)
            if method == "saliency":
                raw = _input_grad(model, x, target).abs().amax(1)
            elif method == "smoothgrad":
                raw = _smoothgrad(model, x, target, samples, noise, generator)
            else:
                raw = integrated_gradients(model, x, target, steps).abs().amax(1)
    return normalize(raw), probs


def normalize(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> each map min-max scaled to [0, 1]; a constant map (no information) becomes zeros."""
    maps = maps.detach().float()
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    # Divide only where the span is positive: 0/0 would be NaN.
    return torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, steps: int = 32
) -> torch.Tensor:
    """Signed attributions (B, C, H, W) from a black baseline (zeros in pixel space).

    attribution = x * mean of d logit_target / dx at x * (k + 0.5) / steps, k = 0 .. steps - 1 (Riemann
    midpoints). Completeness: attributions sum to about logit(x) - logit(0), closer with more steps.
    The interpolated images are batched, at most MAX_BATCH per forward pass.
    """
    if steps < 1:
        raise ConfigError(f"integrated gradients needs steps >= 1; got {steps}")
    x = _check_input(x)
    with eval_mode(model):
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(1)
        target = _resolve_target(target, torch.empty(len(x), 0, device=x.device))
        alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
        per_pass = max(1, MAX_BATCH // len(x))
        total = torch.zeros_like(x)
        for chunk in alphas.split(per_pass):
            xs = (chunk.view(-1, 1, 1, 1, 1) * x).flatten(0, 1)  # (c * B, C, H, W), alpha-major
            grads = _input_grad(model, xs, target.repeat(len(chunk)))
            total += grads.view(len(chunk), *x.shape).sum(0)
    return x * total / steps


def overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """Gray digit (H, W) in [0, 1] with a heat map of `attribution` (H, W) in [0, 1] on top -> (H, W, 3) uint8.

    rgb = (1 - alpha) * gray + alpha * cmap(attribution). inferno starts at black, so where nothing mattered
    the digit shows dimmed on its black background, and the hot pixels glow orange to yellow.
    """
    from matplotlib import colormaps  # lazy: the server imports this module without drawing anything

    img = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    att = np.nan_to_num(np.clip(np.asarray(attribution, dtype=np.float64), 0, 1))
    if img.ndim != 2 or img.shape != att.shape:
        raise ValueError(
            f"overlay needs an image and an attribution of the same (H, W) shape; got {img.shape} and {att.shape}"
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay alpha must be in [0, 1]; got {alpha}")
    heat = colormaps[cmap](att)[..., :3]
    rgb = (1 - alpha) * img[..., None] + alpha * heat
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- internals


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or len(x) == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else ""
        raise ValueError(
            f"expected a non-empty float batch (B, C, H, W) in [0, 1]; got {shape} {dtype}. "
            "For uint8 images pass x.float() / 255"
        )
    return x.detach()


def _resolve_target(target: torch.Tensor | int | None, probs: torch.Tensor) -> torch.Tensor:
    """(B,) long class indices on probs' device; None -> the predicted class; one int applies to all."""
    b = len(probs)
    if target is None:
        return probs.argmax(1)
    target = torch.as_tensor(target, dtype=torch.long, device=probs.device).reshape(-1)
    if target.numel() == 1 and b != 1:
        target = target.expand(b)
    if target.numel() != b:
        raise ValueError(f"target must hold one class index per image ({b}); got {target.numel()}")
    k = probs.shape[1]
    if k and ((target < 0) | (target >= k)).any():
        raise ValueError(f"target class indices must be in [0, {k - 1}]; got {target.tolist()}")
    return target


def _input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / dx for each image (B, C, H, W). Images are independent in eval mode, so the gradient
    of the batch sum is every image's own gradient."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x)
    return grad


def _smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    samples: int,
    noise: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Mean |d logit / dx| over `samples` copies of x plus N(0, noise^2) (pixel range [0, 1], so noise is
    the paper's noise level times the range). Not clamped, as in the paper. One batch of B per sample."""
    if samples < 1 or noise < 0:
        raise ConfigError(f"smoothgrad needs samples >= 1 and noise >= 0; got samples={samples}, noise={noise}")
    total = torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype, device=x.device)
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        total += _input_grad(model, x + noise * eps, target).abs().amax(1)
    return total / samples


def _gradcam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, model_name: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(sum_c w_c A_c) upsampled to the input, w_c = spatial mean of d logit_target / d A_c, A the output
    of forward_features. Only the head is differentiated: the features are computed without a graph."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ConfigError("gradcam needs a model split into forward_features and forward_head (a DigitModel)")
    with torch.no_grad():
        feats = model.forward_features(x)
    if feats.ndim != 4:
        name = f"model {model_name!r}" if model_name else "this model"
        raise ConfigError(
            f"gradcam needs spatial feature maps; {name} has none (its features have shape {tuple(feats.shape)}); "
            "use --method saliency, smoothgrad or integrated-gradients"
        )
    with torch.enable_grad():
        feats = feats.detach().requires_grad_(True)
        logits = model.forward_head(feats)
        probs = logits.detach().float().softmax(1)
        target = _resolve_target(target, probs)
        (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    return cam[:, 0], probs
