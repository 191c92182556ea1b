"""Drawing weights of a given standard deviation from one of three distributions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")

# Standard deviation of N(0, 1) truncated to [-2, 2]: a truncated draw is rescaled by it so that the
# weights have the planned standard deviation, not the untruncated one.
_TRUNCATED_STD = math.sqrt(1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2 * math.pi) / math.erf(2.0 / math.sqrt(2.0)))


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} is not one of {DISTRIBUTIONS}")
    return distribution


@torch.no_grad()
def unit_draw_(tensor: Tensor, distribution: str = "normal", generator: torch.Generator | None = None) -> Tensor:
    r"""Fill ``tensor`` with the unit-scale law of ``distribution``; :func:`sample_` scales it.

    ``normal``: N(0, 1). ``uniform``: :math:`U(-\sqrt{3}, \sqrt{3})` (variance 1). ``truncated_normal``:
    a normal truncated at two of its standard deviations, widened to variance 1. ``orthogonal``: a
    (semi-)orthogonal matrix of the flattened weight (``torch.nn.init.orthogonal_`` with gain 1).
    """
    if distribution == "orthogonal":
        return torch.nn.init.orthogonal_(tensor, gain=1.0, generator=generator)
    check_distribution(distribution)
    if distribution == "normal":
        return tensor.normal_(0.0, 1.0, generator=generator)
    if distribution == "uniform":
        bound = math.sqrt(3.0)  # the variance of U(-a, a) is a²/3
        return tensor.uniform_(-bound, bound, generator=generator)
    s0 = 1.0 / _TRUNCATED_STD
    return torch.nn.init.trunc_normal_(tensor, 0.0, s0, -2.0 * s0, 2.0 * s0, generator=generator)


def unit_scale(std: float, distribution: str, shape: tuple[int, ...]) -> float:
    """The factor that turns :func:`unit_draw_` into draws of standard deviation ``std``.

    An orthogonal draw has entries of variance ``1 / max(rows, cols)``, not 1.
    """
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and non-negative, got {std}")
    if distribution == "orthogonal":
        rows = shape[0]
        cols = math.prod(shape[1:])
        return std * math.sqrt(max(rows, cols))
    return std


@torch.no_grad()
def sample_(tensor: Tensor, std: float, distribution: str = "normal", generator: torch.Generator | None = None) -> Tensor:
    r"""Fill ``tensor`` with i.i.d. zero-mean draws of standard deviation ``std``.

    ``uniform`` draws from :math:`U(-a, a)` with :math:`a = \sqrt{3}\,\mathrm{std}`;
    ``truncated_normal`` draws from a normal truncated at two of its standard deviations, widened so
    that the truncated draw has standard deviation ``std``. The draw is the unit-scale one of
    :func:`unit_draw_` times ``std``, so it is the same whether the unit draw was made now or ahead
    of time (see :mod:`initscope.draws`).

    Args:
        tensor: the tensor to fill (in place).
        std: the standard deviation of each entry.
        distribution: one of ``"normal"``, ``"uniform"``, ``"truncated_normal"``.
        generator: a ``torch.Generator`` to draw from.

    Examples:
        >>> w = torch.empty(64, 3, 7, 7)
        >>> initscope.sample_(w, 0.05, "uniform")
    """
    check_distribution(distribution)
    scale = unit_scale(std, distribution, tuple(tensor.shape))
    return unit_draw_(tensor, distribution, generator).mul_(scale)
