"""Models by name: initscope's own, torchvision's, or any ``module:callable``.

``create_model("plain34")``, ``create_model("resnet18-nobn")`` (torchvision's ResNet-18 with its
BatchNorms replaced by Identity), ``create_model("mobilenet_v2")`` (any torchvision classification
model, built with random weights: nothing is downloaded) or ``create_model("mypkg.nets:build")``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from initscope.models.plain import plain34

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor available to :func:`create_model` and the CLI."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


register_model("plain34")(plain34)


@register_model("resnet18-nobn")
def resnet18_nobn(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 without BatchNorm (``norm_layer=nn.Identity``)."""
    from torchvision.models import resnet18

    return resnet18(norm_layer=nn.Identity, num_classes=num_classes)


def list_models() -> list[str]:
    """initscope's own model names (torchvision's are accepted too)."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, with random weights."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r} for model {name!r}: {exc}") from exc
        fn = getattr(module, attr, None)
        if fn is None:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        model = fn(**kwargs) if callable(fn) and not isinstance(fn, nn.Module) else fn
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name!r} gave a {type(model).__name__}, not a torch.nn.Module")
        return model
    from torchvision import models as tvm

    available = set(tvm.list_models(module=tvm))
    if name in available:
        return tvm.get_model(name, weights=None, **kwargs)
    raise ValueError(
        f"unknown model {name!r}: use one of initscope's ({', '.join(list_models())}), a torchvision "
        "classification model name (e.g. resnet50, mobilenet_v2), or 'package.module:callable'"
    )


__all__ = ["create_model", "list_models", "plain34", "register_model", "resnet18_nobn"]
