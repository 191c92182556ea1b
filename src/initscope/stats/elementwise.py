"""An elementwise function as the propagation sees it: found once by probing it on a grid.

The rules need to know of an activation f whether it is positively homogeneous (``f(αx) = α f(x)``:
its second moments scale with its input's), monotone (a max pool of ``f(u)`` is ``f(max u)``), and,
for the ReLU family (``x`` above zero, ``a x`` below), its negative slope ``a``, for which every
Gaussian integral has a closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from initscope.stats.dist import DTYPE


@dataclass(frozen=True, eq=False)
class Activation:
    """An elementwise function, with the properties the rules use, found by probing it."""

    key: str
    fn: Callable[[Tensor], Tensor]
    homogeneous: bool
    monotone: bool
    slope: float | None  # negative-side slope when f is x above 0 and slope*x below (the ReLU family)

    @staticmethod
    def probe(key: str, fn: Callable[[Tensor], Tensor]) -> "Activation":
        return _probe(key, fn)

    def deriv(self, x: Tensor) -> Tensor:
        if self.slope is not None:
            # The ReLU family: 1 above zero, the slope at and below it (as autograd gives for relu
            # and leaky_relu), without an autograd pass.
            return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, self.slope))
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.fn(x).sum(), x)
        return g


_ACTIVATIONS: dict[str, Activation] = {}


def _probe(key: str, fn: Callable[[Tensor], Tensor]) -> Activation:
    cached = _ACTIVATIONS.get(key)
    if cached is not None:
        return cached
    x = torch.linspace(-20, 20, 4001, dtype=DTYPE)
    with torch.no_grad():
        y = fn(x)
        homogeneous = bool(torch.allclose(fn(2.5 * x), 2.5 * y, rtol=1e-9, atol=1e-12))
        monotone = bool((y[1:] - y[:-1] >= -1e-12).all())
        slope = None
        if homogeneous:
            a = float(-fn(torch.tensor([-1.0], dtype=DTYPE)))
            if torch.allclose(y, torch.where(x > 0, x, a * x), rtol=1e-9, atol=1e-12):
                slope = a
    act = Activation(key, fn, homogeneous, monotone, slope)
    _ACTIVATIONS[key] = act
    return act


def known_activation(key: str) -> Activation | None:
    """The activation probed before under ``key``, if any (building a module to probe costs more than a lookup)."""
    return _ACTIVATIONS.get(key)
