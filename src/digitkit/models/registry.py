"""The registry and the base class every model shares."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from digitkit.errors import ConfigError

_REGISTRY: dict[str, Callable[..., DigitModel]] = {}
TASKS = ("classify", "sequence")
"""classify: one digit, (B, C, H, W) -> logits (B, K). sequence: a row of digits of any width, (B, C, H, W) ->
per-frame logits (B, T, K + 1) for CTC, class 0 the blank (digitkit.realworld.ctc decodes them)."""


class DigitModel(nn.Module):
    """Input (B, C, H, W) in [0, 1] -> logits (B, K).

    Normalization lives inside the model as buffers, so a checkpoint or an exported graph carries its own
    input contract. `forward_features` gives the last spatial feature map for CNNs (what Grad-CAM needs) and
    `forward_head` maps it to logits.
    """

    def __init__(self, features: nn.Module, head: nn.Module, mean: float = 0.1307, std: float = 0.3081):
        super().__init__()
        self.features = features
        self.head = head
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register_model(fn: Callable[..., DigitModel] | None = None, *, task: str = "classify") -> Any:
    """Decorator: the function's name is the model's name; its keyword arguments are the model's options.
    `@register_model(task="sequence")` registers a row reader (see TASKS)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")

    def add(fn: Callable[..., DigitModel]) -> Callable[..., DigitModel]:
        fn.task = task  # type: ignore[attr-defined]
        _REGISTRY[fn.__name__] = fn
        return fn

    return add(fn) if fn is not None else add


def list_models(task: str | None = "classify") -> list[str]:
    """The registered models of `task` (TASKS; None: every model)."""
    return sorted(n for n, fn in _REGISTRY.items() if task is None or model_task(n) == task)


def model_task(name: str) -> str:
    """What a registered model does: classify (one digit) or sequence (a row of digits)."""
    _check_name(name)
    return getattr(_REGISTRY[name], "task", "classify")


def model_options(name: str) -> dict[str, object]:
    """The tunable keyword arguments of a model and their defaults."""
    _check_name(name)
    params = inspect.signature(_REGISTRY[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("num_classes", "in_chans", "img_size")}


def model_description(name: str) -> str:
    _check_name(name)
    return (_REGISTRY[name].__doc__ or "").strip().split("\n")[0]


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 1,
    img_size: int = 28,
    mean: float = 0.1307,
    std: float = 0.3081,
    **kwargs: object,
) -> DigitModel:
    _check_name(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option {unknown[0]!r}; its options are: "
            f"{', '.join(f'{k}={v}' for k, v in options.items()) or 'none'}"
        )
    features, head = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    return DigitModel(features, head, mean=mean, std=std)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models(None))}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, in_chans: int = 1, img_size: int = 28, width: int | None = None) -> int:
    """Multiply-adds for one image (img_size x `width`, square by default), counted from the convolutions and
    linear layers actually run (an LSTM's are not counted)."""
    total = 0

    def conv_hook(m: nn.Conv2d | nn.Conv1d, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: nn.Linear, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features * (out[0].numel() // m.out_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, width or img_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total
