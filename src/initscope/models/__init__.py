"""Models by name: initscope's own, torchvision's, or any ``module:callable``.

``create("plain34", width=16, in_channels=1, num_classes=10)`` builds one of initscope's registered
models (:func:`list_models`): the poster's plain nets ``plain34`` and ``plain50``; ``resnet18``,
``resnet34``, ``resnet50``, ``mobilenet_v2``, ``mobilenet_v3_small`` (torchvision's, with ``width``,
``in_channels``, ``num_classes``, ``norm="none"`` for the BatchNorm-free variant and ``head="paper"`` for
the second paper's 256-unit head); ``mobilenet_v1`` (ours); ``resnet18-nobn`` (= ``resnet18(norm="none")``);
the CIFAR-style ``resnet20``, ``resnet56``, ``resnet110`` (:mod:`initscope.models.cifar`, with
``fixup_scalars=True`` for Fixup's scalar biases and multipliers); ``vit_tiny_like`` and ``unet_like``
(:mod:`initscope.models.vit`, :mod:`initscope.models.unet`: a small pre-norm ViT and an encoder–decoder).
Any other torchvision classification model name (``densenet121``) is built by torchvision with random
weights (nothing is downloaded), and ``"mypkg.nets:build"`` calls ``build(**kw)``.
See docs/experiments-models.md.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import Any, Callable

from torch import nn

from initscope.models.cifar import resnet20, resnet56, resnet110
from initscope.models.plain import plain34, plain50
from initscope.models.unet import unet_like
from initscope.models.vit import vit_tiny_like
from initscope.models.zoo import mobilenet_v1, mobilenet_v2, mobilenet_v3_small, resnet18, resnet34, resnet50

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor available to :func:`create_model` and the CLI.

    A name registered twice is refused (``ValueError``), so a plugin cannot silently replace a model.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


for _name, _fn in [("plain34", plain34), ("plain50", plain50), ("resnet18", resnet18), ("resnet34", resnet34),
                   ("resnet50", resnet50), ("mobilenet_v1", mobilenet_v1), ("mobilenet_v2", mobilenet_v2),
                   ("mobilenet_v3_small", mobilenet_v3_small), ("resnet20", resnet20), ("resnet56", resnet56),
                   ("resnet110", resnet110), ("vit_tiny_like", vit_tiny_like), ("unet_like", unet_like)]:
    register_model(_name)(_fn)


@register_model("resnet18-nobn")
def resnet18_nobn(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision's ResNet-18 without BatchNorm (every norm layer an ``nn.Identity``)."""
    return resnet18(num_classes=num_classes, norm="none", **kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """initscope's registered model names, sorted, optionally filtered by a glob (``"resnet*"``).

    torchvision's other classification models and ``module:callable`` are accepted by
    :func:`create_model` too.
    """
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_registered(name: str) -> bool:
    """Whether ``name`` is one of initscope's registered models (they all take width/in_channels/norm/head)."""
    return name in _REGISTRY


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, with random weights; ``kwargs`` go to its constructor.

    ``name``: one of initscope's (:func:`list_models`), a torchvision classification model, ``timm:NAME``
    (timm's, with ``pretrained=False``; ``pip install 'initscope[timm]'``) or ``package.module:callable``.

    Examples:
        >>> create_model("plain34", width=8, in_channels=1, num_classes=10)
        >>> create_model("resnet18", width=16, norm="none", head="paper", num_classes=12)
    """
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if name.startswith("timm:"):
        return _timm(name[len("timm:"):], kwargs)
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
        "classification model name (e.g. densenet121), or 'package.module:callable'"
    )


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is downloaded)."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"model 'timm:{name}' needs timm: pip install 'initscope[timm]' (or pip install timm)") from None
    if kwargs.get("pretrained"):
        raise ValueError("initscope builds models with random weights: pretrained=True is not allowed")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"timm has no model {name!r} ({exc}); see timm.list_models()") from None


create = create_model

__all__ = ["create", "create_model", "is_registered", "list_models", "mobilenet_v1", "mobilenet_v2",
           "mobilenet_v3_small", "plain34", "plain50", "register_model", "resnet18", "resnet18_nobn",
           "resnet20", "resnet34", "resnet50", "resnet56", "resnet110", "unet_like", "vit_tiny_like"]
