"""Does an augmentation recipe keep digits legible? Ask a model that never trained on it.

Each op of the recipe runs alone on every image (p = 1) at several strengths: 0.5x, 1x, 1.5x and 2x its
configured magnitude (the distance from the identity: degrees, pixels, scale away from 1, noise sigma ...).
A model trained WITHOUT the recipe classifies the results. Where its accuracy falls far below its clean
accuracy, the op at that strength turns digits into something else (a 6 rotated 60 degrees, a 1 erased away)
and training on it teaches the wrong label. Pure: no printing or files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from digitkit import augment
from digitkit.evaluate import accuracy, predict_probs

STRENGTHS = (0.5, 1.0, 1.5, 2.0)

# (op, field) -> the field's identity value; strength k maps v to identity + k * (v - identity).
# Fields not listed (probabilities, aspect ratios, the erase value, elastic smoothness) keep their values.
_MAGNITUDES: dict[tuple[str, str], float] = {
    ("rotation", "degrees"): 0.0,
    ("translate", "pixels"): 0.0,
    ("scale", "min"): 1.0,
    ("scale", "max"): 1.0,
    ("shear", "degrees"): 0.0,
    ("elastic", "alpha"): 0.0,
    ("noise", "sigma"): 0.0,
    ("erasing", "area_min"): 0.0,
    ("erasing", "area_max"): 0.0,
    ("pixels", "drop"): 0.0,
    ("pixels", "add"): 0.0,
    ("stroke", "max_radius"): 0.0,
    ("blur", "sigma_min"): 0.0,
    ("blur", "sigma_max"): 0.0,
    ("lowres", "min_size"): 28.0,  # full resolution (MNIST's 28 px) is the identity; smaller is stronger
    ("lowres", "max_size"): 28.0,
    ("contrast", "min"): 1.0,
    ("contrast", "max"): 1.0,
}
_LOG_MAGNITUDES = {("contrast", "gamma_min"), ("contrast", "gamma_max")}  # identity 1, scaled in log space
_UPPER = {("erasing", "area_min"): 0.9, ("erasing", "area_max"): 0.95, ("pixels", "drop"): 0.95,
          ("pixels", "add"): 0.95, ("rotation", "degrees"): 180.0, ("shear", "degrees"): 60.0}  # fmt: skip


def scaled_op(op: Any, strength: float) -> Any:
    """A copy of `op` with p = 1 and its magnitude scaled by `strength` (clamped to valid values)."""
    changes: dict[str, Any] = {"p": 1.0}
    for f in dataclasses.fields(op):
        key = (op.key, f.name)
        v = getattr(op, f.name)
        if key in _MAGNITUDES:
            ident = _MAGNITUDES[key]
            new = ident + strength * (v - ident)
            new = max(new, {"scale": 0.05, "blur": 0.05, "lowres": 2.0}.get(op.key, 0.0))
            new = min(new, _UPPER.get(key, math.inf))
            changes[f.name] = max(1, round(new)) if isinstance(v, int) else new
        elif key in _LOG_MAGNITUDES:
            changes[f.name] = math.exp(strength * math.log(v))
    return dataclasses.replace(op, **changes)


def active_ops(cfg: augment.AugmentConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name).p > 0]


def only(op_name: str, op: Any) -> augment.AugmentConfig:
    """An AugmentConfig where only this op runs."""
    return dataclasses.replace(augment.AugmentConfig(), **{op_name: op})


def check_recipe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: augment.AugmentConfig,
    strengths: tuple[float, ...] = STRENGTHS,
    seed: int = 0,
    warn_drop_pp: float = 5.0,
) -> dict[str, Any]:
    """Accuracy of `model` on images (N, 1, H, W) uint8 after each op of `recipe` alone at each strength, and
    after the whole recipe; `warnings` lists op/strength pairs whose accuracy is more than `warn_drop_pp`
    percentage points below clean."""
    clean = _accuracy(model, images.float().div(255), labels)
    rows = []
    for name in active_ops(recipe):
        op = getattr(recipe, name)
        for k in strengths:
            cfg = only(name, scaled_op(op, k))
            acc = _accuracy(model, augment.augmented_copy(images, cfg, seed), labels)
            params = {f.name: getattr(getattr(cfg, name), f.name) for f in dataclasses.fields(op) if f.name != "p"}
            rows.append({"op": name, "strength": k, "params": params, "accuracy": acc, "drop_pp": 100 * (clean - acc)})
    whole = _accuracy(model, augment.augmented_copy(images, recipe, seed), labels) if recipe.enabled else clean
    warnings = [
        f"{r['op']} at {r['strength']:g}x ({_fmt(r['params'])}): accuracy {100 * r['accuracy']:.1f}% vs "
        f"{100 * clean:.1f}% clean (-{r['drop_pp']:.1f} pp): legibility collapses; lower its strength"
        for r in rows
        if r["drop_pp"] > warn_drop_pp
    ]
    if recipe.enabled and 100 * (clean - whole) > warn_drop_pp:
        warnings.append(f"the whole recipe (as configured, with its probabilities): {100 * whole:.1f}% vs "
                        f"{100 * clean:.1f}% clean")  # fmt: skip
    return {"n": len(labels), "clean_accuracy": clean, "recipe_accuracy": whole, "rows": rows,
            "warn_drop_pp": warn_drop_pp, "warnings": warnings}  # fmt: skip


def _accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy(predict_probs(model, x), labels)


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
