"""Dense baseline."""

from __future__ import annotations

from torch import nn

from digitkit.models.registry import register_model


@register_model
def mlp(
    num_classes: int, in_chans: int, img_size: int, hidden: tuple[int, ...] = (512, 256), dropout: float = 0.2
) -> tuple[nn.Module, nn.Module]:
    """Flatten -> [Linear-BN-ReLU-Dropout] x len(hidden) -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_chans * img_size * img_size
    for h in hidden:
        layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers), nn.Linear(width, num_classes)
