"""Row readers: a CNN over a whole row of digits (height fixed, any width) and a 1-D head, trained with CTC.

The row is never cut into digits: each output frame (4 input columns) scores the blank and the ten digits, and
the CTC decoder (digitkit.realworld.ctc) turns the frames into a string. That is what reads touching and
overlapping digits, where cutting first fails (issue 23: touching rows segment right 55-60% of the time).
The head is convolutional by default (fast, exports to ONNX with a dynamic width); `lstm` > 0 adds a BiLSTM.
"""

from __future__ import annotations

import torch
from torch import nn

from digitkit.errors import ConfigError
from digitkit.models.cnn import conv_bn
from digitkit.models.registry import register_model

FRAME_PX = 4
"""Input columns per output frame (two 2x poolings across the width)."""


class SequenceHead(nn.Module):
    """(B, C, h, T) features -> (B, T, num_classes + 1) logits, class 0 the CTC blank."""

    def __init__(self, channels: int, feature_height: int, hidden: int, num_classes: int, context: int,
                 lstm: int, dropout: float):  # fmt: skip
        super().__init__()
        # The whole feature column becomes one vector per frame: where ink sits in the height matters (a 6 vs a 9's
        # loop), so it is learned, not averaged away.
        self.collapse = nn.Sequential(nn.Conv2d(channels, hidden, (feature_height, 1), bias=False),
                                      nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))  # fmt: skip
        layers: list[nn.Module] = []
        for i in range(context):  # dilations 1, 2, 4...: each frame sees its neighbours' digits
            d = 2**i
            layers += [nn.Conv1d(hidden, hidden, 3, padding=d, dilation=d, bias=False), nn.BatchNorm1d(hidden),
                       nn.ReLU(inplace=True)]  # fmt: skip
        self.context = nn.Sequential(*layers)
        self.lstm = nn.LSTM(hidden, lstm, batch_first=True, bidirectional=True) if lstm else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out = nn.Linear(2 * lstm if lstm else hidden, num_classes + 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = self.context(self.collapse(f).squeeze(2))  # (B, hidden, T)
        z = z.transpose(1, 2)  # (B, T, hidden)
        if self.lstm is not None:
            z = self.lstm(z)[0]
        return self.out(self.dropout(z))


@register_model(task="sequence")
def crnn(
    num_classes: int,
    in_chans: int,
    img_size: int,
    channels: tuple[int, ...] = (32, 64, 128),
    hidden: int = 128,
    context: int = 2,
    lstm: int = 0,
    dropout: float = 0.1,
):
    """Row reader: 3 conv stages (32, 64, 128; 1, 2, 3 convs) over a row img_size px tall, a frame per 4 columns,
    a dilated 1-D conv head (optionally a BiLSTM); CTC over blank + digits."""
    channels = tuple(channels)
    if len(channels) != 3 or img_size % 8 or img_size < 16:
        raise ConfigError(f"crnn: channels {channels} with rows {img_size} px tall: expected three stage widths "
                          "and a height that is a multiple of 8, at least 16 (rows.height)")  # fmt: skip
    c1, c2, c3 = channels
    features = nn.Sequential(
        *conv_bn(in_chans, c1), nn.MaxPool2d(2),
        *conv_bn(c1, c2), *conv_bn(c2, c2), nn.MaxPool2d(2),
        *conv_bn(c2, c3), *conv_bn(c3, c3), nn.MaxPool2d((2, 1)),  # height only: frames stay 4 columns wide
        *conv_bn(c3, c3),
    )  # fmt: skip
    head = SequenceHead(c3, img_size // 8, hidden, num_classes, context, lstm, dropout)
    return features, head
