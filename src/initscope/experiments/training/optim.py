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
