"""Optimizers and learning-rate schedules by name.

Optimizers (the ASV poster's Table 3 and the second paper's): ``sgd`` (no momentum), ``sgd-nesterov``
(Nesterov momentum 0.9), ``adadelta``, ``adagrad``, ``rmsprop``, ``adam``, ``adamw``; each with
PyTorch's defaults apart from the learning rate and weight decay.

Schedules, as a pure function of the epoch (0-based) that sets the learning rate for that epoch:

- ``constant``: :math:`\\eta_e = \\eta_0`.
- ``step``: :math:`\\eta_e = \\eta_0 \\gamma^{|\\{s \\in S : s \\le e\\}|}` for the epochs ``S`` of
  ``step_epochs`` (the second paper: ÷10 at epochs 30 and 60).
- ``cosine``: :math:`\\eta_e = \\eta_0 (1 + \\cos(\\pi e / E)) / 2` over ``E`` epochs.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, weight_decay=wd),
    "sgd-nesterov": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
    "adadelta": lambda p, lr, wd: torch.optim.Adadelta(p, lr=lr, weight_decay=wd),
    "adagrad": lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
    "rmsprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, weight_decay=wd),
    "adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, weight_decay=wd),
    "adamw": lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
}
OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``.

    Examples:
        >>> make_optimizer("sgd-nesterov", model.parameters(), lr=0.01)
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    return _OPTIMIZERS[name](params, lr, weight_decay)


# How far each optimizer moves a weight on its first steps, in units of lr, whatever the weight's scale:
# Adam's and AdamW's update is m̂/(√v̂ + ε) ≈ ±1, Adagrad's g/√(g²) = ±1, RMSprop's (α = 0.99, no
# momentum) g/√((1 − α) g²) = ±10; for gradients well above ε. SGD's steps are the gradient's size and
# Adadelta's, from an empty state, too (its ε dominates): not listed.
_FIRST_STEP: dict[str, float] = {"adam": 1.0, "adamw": 1.0, "adagrad": 1.0, "rmsprop": 10.0}


def first_step(name: str, lr: float) -> float | None:
    """About how far optimizer ``name`` moves each weight per step at the start, whatever the weight's
    scale; None where the step follows the gradient's size (``sgd``, ``sgd-nesterov``, ``adadelta``)."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    factor = _FIRST_STEP.get(name)
    return None if factor is None else factor * lr


def small_weights_note(model: torch.nn.Module, name: str, lr: float, ratio: float = 10.0) -> str | None:
    """A note when optimizer ``name`` at ``lr`` will move some weight layers by more than ``1/ratio`` of
    their scale per step at the start (their std below ``ratio`` × :func:`first_step`); None otherwise.

    Zero-initialized weights (Fixup's branch ends, ``residual="zero"``) are meant to start at zero and
    are not listed. This is how a 110-layer residual net without normalization stayed at chance on some
    seeds under Adam 1e-3 (docs/results/README.md, "Depth"): asv-backward's small stream and branch ends
    at std 0.005–0.01, moved by ~1e-3 per step in the same direction in every block."""
    step = first_step(name, lr)
    if step is None:
        return None
    small = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim < 2 or not weight.requires_grad:
            continue
        std = float(weight.detach().float().std())
        if 0.0 < std < ratio * step:
            small.append((module_name, std))
    if not small:
        return None
    small.sort(key=lambda item: item[1])
    shown = ", ".join(f"{n} ({s:.2g})" for n, s in small[:3]) + (", ..." if len(small) > 3 else "")
    return (f"{name} moves every weight by about {step:.2g} per step at the start, whatever its scale; "
            f"{len(small)} weight layer(s) start with a std below {ratio:g}x that ({shown}): their first steps "
            f"change them by over {100 / ratio:.0f} % each. Deep nets without normalization can die in a few "
            "steps this way (docs/results/README.md, \"Depth\"); a smaller lr keeps them")


def lr_at(epoch: int, base_lr: float, schedule: str = "constant", *, epochs: int = 1,
          step_epochs: Sequence[int] = (), step_gamma: float = 0.1) -> float:
    """The learning rate of ``epoch`` (0-based) under ``schedule`` (see the module doc)."""
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * step_gamma ** sum(1 for s in step_epochs if s <= epoch)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
