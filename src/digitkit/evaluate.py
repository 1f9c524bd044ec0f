"""Metrics in, numbers out. The full evaluation (per-class P/R/F1, calibration, robustness) builds on these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """images (N, 1, H, W) uint8 -> logits (N, K) float32 on the CPU, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for chunk in images.split(batch_size):
            x = chunk.to(device, non_blocking=True).float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
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
