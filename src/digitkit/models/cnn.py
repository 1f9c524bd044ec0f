"""Convolutional families: cnn1/2/3 (one conv block per stage), lenet_like, classic (VGG-style pairs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from digitkit.errors import ConfigError
from digitkit.models.registry import register_model


def conv_bn(cin: int, cout: int, kernel: int = 3) -> list[nn.Module]:
    # No conv bias: batch norm's shift makes it redundant.
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _stages(in_chans: int, channels: tuple[int, ...], convs_per_stage: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_chans
    for cout in channels:
        for _ in range(convs_per_stage):
            layers += conv_bn(cin, cout)
            cin = cout
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _linear_head(channels: int, spatial: int, num_classes: int, dropout: float, hidden: int = 0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = channels * spatial * spatial
    if hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class RejectGate(nn.Module):
    """A head with one more output than there are classes: a "not a digit" logit s. The answer is the mixture
    p = (1 - q) softmax(z) + q / K with q = sigmoid(s), returned as log p (normalized log-probabilities, so every
    consumer of logits, calibration and ONNX included, reads it unchanged). A non-digit can then turn the answer
    to "no idea" through s alone, without flattening the digit logits z that the digits need; outlier exposure's
    loss (cross-entropy of non-digits to uniform) trains s."""

    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x).float()
        z, s = out[:, : self.num_classes], out[:, self.num_classes :]
        digit = F.logsigmoid(-s) + F.log_softmax(z, dim=1)
        return torch.logaddexp(digit, F.logsigmoid(s) - math.log(self.num_classes))


def _cnn(num_classes: int, in_chans: int, img_size: int, channels: tuple[int, ...], dropout: float,
         convs_per_stage: int = 1, reject_gate: bool = False):  # fmt: skip
    spatial = img_size
    for _ in channels:
        spatial //= 2
    head = _linear_head(channels[-1], spatial, num_classes + int(reject_gate), dropout)
    return _stages(in_chans, channels, convs_per_stage), RejectGate(head, num_classes) if reject_gate else head


@register_model
def cnn1(num_classes: int, in_chans: int, img_size: int, channels: tuple[int, ...] = (32,), dropout: float = 0.0):
    """One block: Conv(32)-BN-ReLU-MaxPool, then a linear head."""
    return _cnn(num_classes, in_chans, img_size, tuple(channels), dropout)


@register_model
def cnn2(
    num_classes: int, in_chans: int, img_size: int, channels: tuple[int, ...] = (32, 64), dropout: float = 0.2
):
    """Two blocks: 32, 64 filters, each Conv-BN-ReLU-MaxPool; dropout 0.2 before the linear head."""
    return _cnn(num_classes, in_chans, img_size, tuple(channels), dropout)


@register_model
def cnn3(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (32, 64, 128),
    dropout: float = 0.3,
    reject_gate: bool = False,
):
    """Three blocks: 32, 64, 128 filters, each Conv-BN-ReLU-MaxPool; dropout 0.3 before the linear head.
    reject_gate: one more output, a "not a digit" gate (RejectGate) for training with non-digits."""
    return _cnn(num_classes, in_chans, img_size, tuple(channels), dropout, reject_gate=bool(reject_gate))


@register_model
def cnn3_slim(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (16, 32, 64),
    dropout: float = 0.1,
):
    """cnn3 at half width (16, 32, 64): about 2x faster on a CPU, the default recipe's model."""
    return _cnn(num_classes, in_chans, img_size, tuple(channels), dropout)


@register_model
def cnn3_tiny(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (8, 16, 32),
    dropout: float = 0.1,
):
    """cnn3 at quarter width (8, 16, 32): a quarter of cnn3_slim's multiply-adds, for edge serving
    (configs/edge.yaml)."""
    return _cnn(num_classes, in_chans, img_size, tuple(channels), dropout)


@register_model
def cnn_deep(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (32, 64, 128),
    dropout: float = 0.3,
    border: int = 0,
):
    """Three stages of two Conv-BN-ReLU (32, 64, 128 filters) and a MaxPool each, a VGG-style net: best.yaml's
    model, about 4x cnn3's multiply-adds. border: drop that many pixels at each edge first (CropBorder; 2 saves
    about a quarter of the work on MNIST-style digits, fast-997.yaml)."""
    _check_border(border, img_size)
    features, head = _cnn(num_classes, in_chans, img_size - 2 * border, tuple(channels), dropout, convs_per_stage=2)
    if border:  # only then: the layer indices (and so the checkpoints) of border-less nets stay as they were
        features = nn.Sequential(CropBorder(border), *features)
    return features, head


def _check_border(border: int, img_size: int) -> None:
    if not 0 <= 2 * border < img_size:
        raise ConfigError(f"model.args.border = {border}: a {img_size}x{img_size} image has no pixels left; expected "
                          f"0 <= border < {img_size // 2}")


class CropBorder(nn.Module):
    """Drop `border` pixels at each edge: MNIST digits sit in a 20x20 box centred by mass in a 28x28 frame, so a
    2-px border is almost always empty and a quarter of the first layer's work is saved."""

    def __init__(self, border: int):
        super().__init__()
        self.border = border

    def forward(self, x):
        b = self.border
        return x[..., b : x.shape[-2] - b, b : x.shape[-1] - b] if b else x


def pool_first_block(cin: int, cout: int) -> list[nn.Module]:
    # Conv -> MaxPool -> BN -> ReLU: max-pooling commutes with ReLU, and pooling before the two memory-bound ops
    # lets them run on a quarter of the pixels (about 1.3x faster training steps on a CPU than Conv-BN-ReLU-Pool).
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    return [conv, nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model
def cnn_fast(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (16, 32, 64),
    border: int = 2,
    dropout: float = 0.0,
):
    """Three Conv-Pool-BN-ReLU blocks (16, 32, 64) on the image less a 2-px border: fast.yaml's model, sized for
    one pass over MNIST on a CPU."""
    _check_border(border, img_size)
    layers: list[nn.Module] = [CropBorder(border)]
    cin, spatial = in_chans, img_size - 2 * border
    for cout in channels:
        layers += pool_first_block(cin, cout)
        cin, spatial = cout, spatial // 2
    return nn.Sequential(*layers), _linear_head(cin, spatial, num_classes, dropout)


@register_model
def lenet_like(num_classes: int, in_chans: int, img_size: int, dropout: float = 0.5):
    """Conv32(5x5)-MaxPool-Conv64(5x5)-MaxPool-Dense128-Dropout0.5-Dense (the Keras/TF tutorial shape)."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )  # fmt: skip
    return features, _linear_head(64, img_size // 4, num_classes, dropout, hidden=128)


@register_model
def classic(num_classes: int, in_chans: int, img_size: int, dropout: float = 0.5):
    """Conv32-Conv32-Pool-Conv64-Conv64-Pool-Dense128-Dropout0.5-Dense, batch norm after each conv."""
    return _stages(in_chans, (32, 64), 2), _linear_head(64, img_size // 4, num_classes, dropout, hidden=128)
