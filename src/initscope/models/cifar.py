"""CIFAR-style residual networks (He et al. 2016, section 4.2): ResNet-20, -56, -110.

A 3x3 conv to ``width`` channels (16 in the paper), three stages of n basic blocks at 1, 2 and 4 times
``width`` channels (stride 2 at the first block of stages 2 and 3), global average pooling and a linear
classifier: 6n + 2 weight layers (n = 3, 9, 18). Shortcuts are parameter-free (the paper's option A):
where a stage halves the map and doubles the channels, the shortcut takes every other position and pads
the new channels with zeros, so every weight layer is on a residual branch or is the stem or the head.

``norm="none"`` removes every BatchNorm: the signal is then the initialization's alone, which is what
Fixup (``initscope.methods.fixup``) and initscope's residual policies are compared on.
``fixup_scalars=True`` adds Fixup's scalar biases (0) before each conv and activation of a branch, and
its scalar multiplier (1) at the branch's end (Zhang et al. 2019, figure 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from initscope.models.zoo import norm_layer, with_head

DEPTHS = {20: 3, 56: 9, 110: 18}


class _Scalar(nn.Module):
    """A learnable scalar added (``kind="bias"``) or multiplied (``kind="scale"``): Fixup's."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.value = nn.Parameter(torch.zeros(1) if kind == "bias" else torch.ones(1))

    def forward(self, x):
        return x + self.value if self.kind == "bias" else x * self.value


class CifarBlock(nn.Module):
    """Two 3x3 convs with a parameter-free shortcut (option A)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm, fixup_scalars: bool) -> None:
        super().__init__()
        scalar = (lambda kind: _Scalar(kind)) if fixup_scalars else (lambda kind: nn.Identity())
        self.bias1a, self.bias1b, self.bias2a = scalar("bias"), scalar("bias"), scalar("bias")
        self.scale, self.bias2b = scalar("scale"), scalar("bias")
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def shortcut(self, x):
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x):
        out = F.relu(self.bias1b(self.bn1(self.conv1(self.bias1a(x)))))
        out = self.bias2b(self.scale(self.bn2(self.conv2(self.bias2a(out)))))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int = 16, in_channels: int = 3, num_classes: int = 10,
                 norm: str = "default", fixup_scalars: bool = False) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth {depth!r} is not one of {tuple(DEPTHS)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width!r}")
        n, bn = DEPTHS[depth], norm_layer(norm)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = bn(width)
        c, stages = width, []
        for i in range(3):
            out = width * 2**i
            blocks = []
            for b in range(n):
                blocks.append(CifarBlock(c, out, 2 if i > 0 and b == 0 else 1, bn, fixup_scalars))
                c = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bias_fc = _Scalar("bias") if fixup_scalars else nn.Identity()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.bias_fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def _cifar(depth: int):
    def build(width: int = 16, in_channels: int = 3, num_classes: int = 10, *, norm: str = "default",
              head: str = "default", fixup_scalars: bool = False) -> nn.Module:
        return with_head(CifarResNet(depth, width, in_channels, num_classes, norm, fixup_scalars), head, norm)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = (f"CIFAR ResNet-{depth} (He et al. 2016): {DEPTHS[depth]} basic blocks per stage at 16-32-64 "
                     "channels (``width`` = 16), parameter-free shortcuts; see :mod:`initscope.models.cifar`.")
    return build


resnet20, resnet56, resnet110 = _cifar(20), _cifar(56), _cifar(110)
