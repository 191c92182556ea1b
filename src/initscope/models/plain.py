"""The ASV poster's plain networks: no normalization, no shortcuts.

``plain34`` is the poster's 34-layer net: an input block (7x7/2 conv, ReLU, 3x3/2 max pool), then
3-4-6-3 blocks of two 3x3 convs with ReLU at 1, 2, 4, 8 times ``width`` channels (stride 2 at the
first conv of stages 2-4), global average pooling and a linear classifier. At ``width=64`` with 3
input channels and 10 classes it has the poster's 2.11e7 parameters.
"""

from __future__ import annotations

from torch import nn

STAGES_34 = (3, 4, 6, 3)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def plain34(width: int = 64, in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """The poster's plain 34-layer CNN, as one ``nn.Sequential`` chain."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    c = width
    for stage, blocks in enumerate(STAGES_34):
        out = width * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += [_conv(c, out, stride), nn.ReLU(), _conv(out, out), nn.ReLU()]
            c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)
