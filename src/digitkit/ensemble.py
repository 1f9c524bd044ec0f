"""Several trained runs answering as one: the mean of their probabilities, equal or weighted by each run's own
validation accuracy (never by anything measured on the test set). Members trained with one `data.split_seed` share
their validation images, which then measure the ensemble as well.

Members may differ in their input preparation: when some were trained on deskewed digits (`preprocess.deskew`) and
some not, the ensemble reads images as the plain ones do and each deskewing member deskews its own copy
(`Deskewed`), exactly as its training data was deskewed (runs.deskewed).

`EnsembleModel` is an nn.Module whose output is the log of the weighted mean probability, so its softmax is
that mean: it drops into anything that takes a model (evaluate_model, the Recognizer behind predict and read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from digitkit.errors import ConfigError

WEIGHTINGS = ("equal", "val")


class Deskewed(nn.Module):
    """A member trained on deskewed digits, in an ensemble whose input is not deskewed: it deskews its input
    (preprocess.deskew_batch, rounded to the 1/255 steps of the uint8 copy it was trained on) and passes it on."""

    def __init__(self, member: nn.Module):
        super().__init__()
        self.member = member

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) uint8 or float in [0, 1] -> deskewed float in [0, 1], what runs.deskewed gives / 255."""
        from digitkit.preprocess import deskew_uint8

        return deskew_uint8(x).float().div(255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(self.prepare(x))


class EnsembleModel(nn.Module):
    """x (B, C, H, W) in [0, 1] -> log of the weighted mean of the members' softmax (B, K).

    `input_deskew`: whether x comes deskewed (every member was trained on deskewed digits). In a mix, x is not
    deskewed and the deskewing members are `Deskewed`."""

    def __init__(self, members: list[nn.Module], weights: list[float], input_deskew: bool = False):
        super().__init__()
        self.input_deskew = input_deskew
        if not members or len(members) != len(weights):
            raise ConfigError("an ensemble needs at least one member and one weight per member")
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights, dtype=torch.float32)
        if (w < 0).any() or float(w.sum()) <= 0:
            raise ConfigError(f"ensemble weights {weights}: expected non-negative numbers with a positive sum")
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.zeros(())
        for w, (m, xm) in zip(self.weights, member_inputs(self, x, Deskewed.prepare), strict=True):
            probs = probs + w * m(xm).float().softmax(1)
        return torch.log(probs.clamp_min(1e-12))


def member_inputs(
    model: EnsembleModel, x: torch.Tensor, deskew: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """(module, its input) per member: a `Deskewed` member's inner model with `deskew(x)`, computed once for all of
    them, and every other member with x."""
    deskewed: torch.Tensor | None = None
    for m in model.members:
        if isinstance(m, Deskewed):
            deskewed = deskew(x) if deskewed is None else deskewed
            yield m.member, deskewed
        else:
            yield m, x


def reads_deskewed(deskew: list[bool]) -> bool:
    """Whether an ensemble of members with these `preprocess.deskew` settings reads deskewed images: only when all
    of them were trained on deskewed digits; in a mix each deskewed member deskews its own copy (`Deskewed`)."""
    return all(deskew)


def build(paths: list[str | Path], weighting: str = "equal") -> tuple[EnsembleModel, list[dict[str, Any]]]:
    """Open every run (folder or checkpoint) and combine them; returns the model and one record per member
    (path, model name, seed, validation accuracy, weight, deskew). Members must agree on classes and input shape;
    in a mix of deskewed and plain members each deskewed one deskews its own input (`Deskewed`)."""
    from digitkit import runs

    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if len(paths) < 2:
        raise ConfigError("an ensemble needs at least two runs; pass several run folders or checkpoints")
    opened = [runs.open_model(p) for p in paths]
    first = opened[0].ckpt
    for o in opened[1:]:
        for key in ("classes", "in_chans", "img_size"):
            if o.ckpt[key] != first[key]:
                raise ConfigError(f"{o.checkpoint_path}: its {key} {o.ckpt[key]!r} differ from "
                                  f"{opened[0].checkpoint_path}'s {first[key]!r}; members must read the same data")
    val = [float(o.ckpt.get("metrics", {}).get("val_acc", float("nan"))) for o in opened]
    if weighting == "val" and any(v != v for v in val):  # NaN: a checkpoint without validation metrics
        raise ConfigError("--weights val needs every member's validation accuracy, and a member has none (it trained "
                          "on every training image, data.val_fraction 0, or its checkpoint has no validation "
                          "metrics); use --weights equal")  # fmt: skip
    weights = val if weighting == "val" else [1.0] * len(opened)
    deskew = [o.cfg.preprocess.deskew for o in opened]
    input_deskew = reads_deskewed(deskew)
    members = [Deskewed(o.model) if d and not input_deskew else o.model for o, d in zip(opened, deskew, strict=True)]
    model = EnsembleModel(members, weights, input_deskew).eval()
    records = [
        {"path": str(o.checkpoint_path), "model": o.cfg.model.name, "seed": o.cfg.seed,
         "val_accuracy": v if v == v else None,  # None: no validation (data.val_fraction 0)
         "weight": float(w), "split_seed": o.cfg.split_seed, "val_fraction": o.cfg.data.val_fraction, "deskew": d}
        for o, v, w, d in zip(opened, val, model.weights.tolist(), deskew, strict=True)
    ]  # fmt: skip
    return model, records


def shared_validation(records: list[dict[str, Any]]) -> bool:
    """True when every member held out the same validation images (one split seed and fraction: `data.split_seed`),
    so the ensemble can be measured on images none of its members trained on. False when they trained on every
    training image (data.val_fraction 0): there are no such images."""
    return len({(r["split_seed"], r["val_fraction"]) for r in records}) == 1 and records[0]["val_fraction"] > 0


def combine(member_probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted mean of the members' probabilities (N, K), as EnsembleModel computes it."""
    return sum(w * p for w, p in zip(weights, member_probs, strict=True))


def member_probs(model: EnsembleModel, images: torch.Tensor, shifts: int = 0) -> list[torch.Tensor]:
    """Each member's probabilities (N, K) for images (N, C, H, W) uint8 or float in [0, 1], prepared as the
    ensemble reads them (`model.input_deskew`): plain, or with test-time shifts (the mean over the image and its
    copies moved `shifts` px left, right, up and down). A `Deskewed` member's copies are shifted after the deskew,
    which would otherwise centre them again; its deskewed images are computed once for all the views."""
    from digitkit import runs
    from digitkit.evaluate import predict_logits, predict_probs_shift_tta

    def deskew(x: torch.Tensor) -> torch.Tensor:  # uint8: the cached copy the member was trained and measured on
        return runs.deskewed(x) if x.dtype == torch.uint8 else Deskewed.prepare(x)

    def probs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if shifts:
            return predict_probs_shift_tta(m, x, shifts, channels_last=True)
        return predict_logits(m, x, channels_last=True).softmax(1)

    return [probs(m, x) for m, x in member_inputs(model, images, deskew)]
