"""The ASV poster's plain networks: no normalization, no shortcuts.

``plain34`` is the poster's 34-layer net: an input block (7x7/2 conv, ReLU, 3x3/2 max pool), then
3-4-6-3 blocks of two 3x3 convs with ReLU at 1, 2, 4, 8 times ``width`` channels (stride 2 at the
first conv of stages 2-4), global average pooling and a linear classifier. At ``width=64`` with 3
input channels and 10 classes it has the poster's 2.11e7 parameters.

``plain50`` is our reading of the poster's 50-layer net, which the poster does not specify: ResNet-50's
layout without its shortcuts and BatchNorms. The same input block, then 3-4-6-3 bottleneck blocks of
1x1 (to ``w``) - 3x3 (``w``, stride 2 in the first block of stages 2-4) - 1x1 (to ``4w``) convs, each
followed by a ReLU, with ``w`` = 1, 2, 4, 8 times ``width``; global average pooling, a linear classifier.
1 + 3·16 + 1 = 50 weight layers. At ``width=64`` it has ResNet-50's conv shapes minus the projection
shortcuts (2.07e7 parameters for 10 classes).

Both work on small inputs (28x28, 32x32): every conv pads, so the maps shrink to 1x1 at worst, and the
global average pool takes whatever size arrives. ``stem="small"`` swaps the input block for a 3x3/1
conv without the max pool (as CIFAR ResNets do), keeping 4x more resolution on small images.
"""

from __future__ import annotations

from torch import nn

STAGES_34 = (3, 4, 6, 3)
STAGES_50 = (3, 4, 6, 3)
STEMS = ("imagenet", "small")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _stem(in_channels: int, width: int, stem: str) -> list[nn.Module]:
    if stem == "imagenet":
        return [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1)]
    if stem == "small":
        return [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False), nn.ReLU()]
    raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")


def _with_head(model: nn.Sequential, head: str, norm: str) -> nn.Sequential:
    from initscope.models.zoo import with_head

    return with_head(model, head, norm)


def _check_plain(norm: str, width: int) -> None:
    # A plain net has no normalization by definition: "default" and "none" are the same net.
    if norm not in ("default", "none"):
        raise ValueError(f"plain nets have no normalization layers: norm={norm!r}; valid: default, none")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width!r}")


def plain34(width: int = 64, in_channels: int = 3, num_classes: int = 10, *, norm: str = "default",
            head: str = "default", stem: str = "imagenet") -> nn.Sequential:
    """The poster's plain 34-layer CNN, as one ``nn.Sequential`` chain.

    Args:
        width: channels of the first stage (64 in the poster); stages have 1, 2, 4, 8 times it.
        in_channels: image channels.
        num_classes: classifier outputs.
        norm: ``default`` or ``none`` (the same: the net has no normalization).
        head: ``default`` (one linear layer) or ``paper`` (see :func:`initscope.models.zoo.with_head`).
        stem: ``imagenet`` (7x7/2 conv + 3x3/2 max pool, the poster's) or ``small`` (3x3/1 conv).

    Examples:
        >>> plain34(width=8, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    _check_plain(norm, width)
    layers: list[nn.Module] = _stem(in_channels, width, stem)
    c = width
    for stage, blocks in enumerate(STAGES_34):
        out = width * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += [_conv(c, out, stride), nn.ReLU(), _conv(out, out), nn.ReLU()]
            c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return _with_head(nn.Sequential(*layers), head, norm)


def plain50(width: int = 64, in_channels: int = 3, num_classes: int = 10, *, norm: str = "default",
            head: str = "default", stem: str = "imagenet") -> nn.Sequential:
    """A plain 50-layer CNN: ResNet-50's bottleneck layout without shortcuts or BatchNorm.

    Stages 3-4-6-3 of 1x1 (``w``) → 3x3 (``w``) → 1x1 (``4w``) convs with a ReLU after each,
    ``w = width · 2^stage``, stride 2 at the 3x3 of the first block of stages 2-4 (as torchvision's
    ResNet-50). The poster names a 50-layer net without giving its layout; this is our choice.

    Args:
        width: bottleneck channels of the first stage (64 = ResNet-50's).
        in_channels: image channels.
        num_classes: classifier outputs.
        norm: ``default`` or ``none`` (the same: the net has no normalization).
        head: ``default`` (one linear layer) or ``paper`` (see :func:`initscope.models.zoo.with_head`).
        stem: ``imagenet`` (7x7/2 conv + 3x3/2 max pool) or ``small`` (3x3/1 conv).

    Examples:
        >>> plain50(width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_plain(norm, width)
    layers: list[nn.Module] = _stem(in_channels, width, stem)
    c = width
    for stage, blocks in enumerate(STAGES_50):
        mid = width * 2**stage
        out = 4 * mid
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += [nn.Conv2d(c, mid, 1, bias=False), nn.ReLU(),
                       _conv(mid, mid, stride), nn.ReLU(),
                       nn.Conv2d(mid, out, 1, bias=False), nn.ReLU()]
            c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return _with_head(nn.Sequential(*layers), head, norm)
