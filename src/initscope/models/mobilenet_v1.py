"""MobileNet (v1), Howard et al. 2017, arXiv 1704.04861: depthwise-separable convolutions, 28 layers.

A 3x3/2 standard conv to ``32·α`` channels, then 13 depthwise-separable blocks, each a 3x3 depthwise
conv (``groups = channels``) and a 1x1 pointwise conv, both followed by BatchNorm and ReLU, then
global average pooling and a linear classifier: 1 + 2·13 + 1 = 28 weight layers (the paper's Table 1).
Channels (at α = 1) and depthwise strides:

    64/1, 128/2, 128/1, 256/2, 256/1, 512/2, 5 × 512/1, 1024/2, 1024/1

``α`` (``width_mult``) scales every channel count, rounded to at least 8. ``norm="none"`` replaces the
BatchNorms by Identity. The total stride is 32, and every conv pads, so 28x28 and 32x32 inputs reach
the global pool as a 1x1 map.
"""

from __future__ import annotations

from torch import nn

# (pointwise output channels at α = 1, depthwise stride) for the 13 separable blocks
BLOCKS_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _scaled(c: int, width_mult: float) -> int:
    return max(8, int(round(c * width_mult)))


def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int, groups: int, norm: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet v1: ``features`` (the stem and 13 separable blocks), then ``pool`` and ``classifier``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
        norm = norm_layer or nn.BatchNorm2d
        c = _scaled(32, width_mult)
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, c, 3, 2, 1, norm)]
        for c_out, stride in BLOCKS_V1:
            c_out = _scaled(c_out, width_mult)
            layers += [_conv_bn_relu(c, c, 3, stride, c, norm),  # depthwise: one filter per channel
                       _conv_bn_relu(c, c_out, 1, 1, 1, norm)]   # pointwise: mixes channels
            c = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))
