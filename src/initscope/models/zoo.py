"""torchvision's ResNets and MobileNets with the knobs the experiments need.

Every constructor here takes ``width`` (the stem's channels), ``in_channels``, ``num_classes``,
``norm`` and ``head``:

- ``width``: ResNets take it as the first stage's channels (64 = torchvision's; stages have 1, 2, 4, 8
  times it, built from torchvision's own ``BasicBlock``/``Bottleneck``). MobileNets take it as their
  stem's channels and turn it into ``width_mult = width / 32`` (v1, v2) or ``width / 16`` (v3-small),
  which may also be given directly.
- ``norm``: ``default`` (BatchNorm, as published) or ``none`` (every norm layer an ``nn.Identity``:
  the BatchNorm-free variants whose signal only the initialization controls).
- ``head``: ``default`` (the published classifier) or ``paper``: the second paper's head, a 256-unit
  linear layer, BatchNorm1d and ReLU inserted before the final linear layer
  (``Linear(d, 256) → BatchNorm1d(256) → ReLU → Linear(256, classes)``); with ``norm="none"`` its
  BatchNorm is an Identity too.

At width 64 (1.0) and 3 channels the modules, names and shapes are torchvision's, so checkpoints map.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

NORMS = ("default", "none")
HEADS = ("default", "paper")
PAPER_HEAD_UNITS = 256


def norm_layer(norm: str, default: Callable[..., nn.Module] = nn.BatchNorm2d) -> Callable[..., nn.Module]:
    """The norm layer class for ``norm``: the architecture's ``default`` or ``nn.Identity`` for ``none``."""
    if norm == "default":
        return default
    if norm == "none":
        return nn.Identity
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def _parent(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = qualname.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def set_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``Conv2d`` of ``model`` for ``in_channels`` input channels (in place; returns it)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_channels:
                if m.groups != 1:
                    raise ValueError(f"the first conv {name!r} is grouped; cannot change its input channels")
                new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode)
                parent, attr = _parent(model, name)
                setattr(parent, attr, new)
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d whose input channels could be set")


def with_head(model: nn.Module, head: str, norm: str = "default") -> nn.Module:
    """Apply ``head`` to ``model`` (in place; returns it): ``default`` leaves it, ``paper`` replaces the
    last ``nn.Linear(d, k)`` by ``Linear(d, 256) → BatchNorm1d(256) → ReLU → Linear(256, k)``."""
    if head == "default":
        return model
    if head != "paper":
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to put the paper's head before")
    name, fc = last[-1]
    parent, attr = _parent(model, name)
    setattr(parent, attr, nn.Sequential(
        nn.Linear(fc.in_features, PAPER_HEAD_UNITS),
        norm_layer(norm, nn.BatchNorm1d)(PAPER_HEAD_UNITS),
        nn.ReLU(inplace=True),
        nn.Linear(PAPER_HEAD_UNITS, fc.out_features),
    ))
    return model


class ResNet(nn.Module):
    """torchvision's ResNet layout at any base ``width``, from torchvision's own residual blocks.

    Attribute names (``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``) and the forward pass are
    torchvision's ``ResNet``'s; at ``width=64`` so are all parameter shapes.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], width: int = 64, in_channels: int = 3,
                 num_classes: int = 1000, norm: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            out = planes * block.expansion
            blocks = []
            for b in range(n):
                stride = 2 if i > 0 and b == 0 else 1
                down = None
                if stride != 1 or c != out:  # a projection shortcut where the shape changes, as torchvision
                    down = nn.Sequential(nn.Conv2d(c, out, 1, stride=stride, bias=False), norm(out))
                blocks.append(block(c, planes, stride, down, norm_layer=norm))
                c = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet(block_name: str, layers: tuple[int, ...], width: int, in_channels: int, num_classes: int,
            norm: str, head: str) -> nn.Module:
    from torchvision.models import resnet as tvr

    block = getattr(tvr, block_name)
    model = ResNet(block, layers, width, in_channels, num_classes, norm_layer(norm))
    return with_head(model, head, norm)


def resnet18(width: int = 64, in_channels: int = 3, num_classes: int = 1000, *, norm: str = "default",
             head: str = "default") -> nn.Module:
    """ResNet-18 (He et al. 2016): 2-2-2-2 basic blocks. ``norm="none"`` is the BatchNorm-free variant."""
    return _resnet("BasicBlock", (2, 2, 2, 2), width, in_channels, num_classes, norm, head)


def resnet34(width: int = 64, in_channels: int = 3, num_classes: int = 1000, *, norm: str = "default",
             head: str = "default") -> nn.Module:
    """ResNet-34: 3-4-6-3 basic blocks."""
    return _resnet("BasicBlock", (3, 4, 6, 3), width, in_channels, num_classes, norm, head)


def resnet50(width: int = 64, in_channels: int = 3, num_classes: int = 1000, *, norm: str = "default",
             head: str = "default") -> nn.Module:
    """ResNet-50: 3-4-6-3 bottleneck blocks (the second paper's ResNet)."""
    return _resnet("Bottleneck", (3, 4, 6, 3), width, in_channels, num_classes, norm, head)


def _width_mult(width: int | None, width_mult: float | None, stem: int) -> float:
    if width is not None and width_mult is not None:
        raise ValueError(f"give width ({width}) or width_mult ({width_mult}), not both")
    if width is not None:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width!r}")
        return width / stem
    return 1.0 if width_mult is None else float(width_mult)


def mobilenet_v1(width: int | None = None, in_channels: int = 3, num_classes: int = 1000, *,
                 width_mult: float | None = None, norm: str = "default", head: str = "default") -> nn.Module:
    """MobileNet v1 (Howard et al. 2017), 28 layers; ``width`` = stem channels (32 · width_mult)."""
    from initscope.models.mobilenet_v1 import MobileNetV1

    model = MobileNetV1(num_classes, _width_mult(width, width_mult, 32), in_channels, norm_layer(norm))
    return with_head(model, head, norm)


def mobilenet_v2(width: int | None = None, in_channels: int = 3, num_classes: int = 1000, *,
                 width_mult: float | None = None, norm: str = "default", head: str = "default") -> nn.Module:
    """torchvision's MobileNetV2; ``width`` = stem channels (32 · width_mult, rounded to 8 by torchvision)."""
    from torchvision.models import MobileNetV2

    model = MobileNetV2(num_classes=num_classes, width_mult=_width_mult(width, width_mult, 32),
                        norm_layer=norm_layer(norm))
    return with_head(set_in_channels(model, in_channels), head, norm)


def mobilenet_v3_small(width: int | None = None, in_channels: int = 3, num_classes: int = 1000, *,
                       width_mult: float | None = None, norm: str = "default", head: str = "default") -> nn.Module:
    """torchvision's MobileNetV3-Small; ``width`` = stem channels (16 · width_mult)."""
    from functools import partial

    from torchvision.models import mobilenet_v3_small as tv_v3_small

    # torchvision's own BatchNorm settings for v3 (eps 1e-3, momentum 0.01), or Identity
    default_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    model = tv_v3_small(weights=None, num_classes=num_classes, width_mult=_width_mult(width, width_mult, 16),
                        norm_layer=norm_layer(norm, default_norm))
    return with_head(set_in_channels(model, in_channels), head, norm)
