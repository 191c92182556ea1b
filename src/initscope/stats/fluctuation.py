"""Finite width: how much one weight draw's second moments scatter around the ensemble mean.

Mean-field propagation gives ``E_W[q]``, the second moment averaged over weight draws, and for
conv/ReLU chains it is exact (a weight sign flip maps ``u`` to ``-u``, so ``E_W[relu(u)²] =
E_W[u²] / 2`` position by position). But a single network is one draw, and its ``q`` is a product
of per-layer factors that each scatter by O(1/C). The typical draw — what the geometric mean over
draws estimates, and what a user sees — sits below the mean by half the variance of ``log q``:

    E[log q] ≈ log E[q] − ½ Var(log q).

Where the scatter comes from. A conv output channel ``c`` is ``u_c = w_c · x``. The part of ``x`` that is
the same for every sample (its mean, the ``xcorr`` share ξ of its second moment) gives channel ``c`` a
fixed offset ``b_c ~ N(0, ξ q)``; the rest varies from sample to sample and averages out. A
following activation ``f`` then leaves channel ``c`` with second moment ``G(b_c) = E_v[f(b_c + v)²]``,
``v ~ N(0, (1 − ξ) q)``, and lets gradients through with ``H(b_c) = E_v[f'(b_c + v)²]``. With C
independent channels:

    Var(log q_out) = Var(log q_in) + Var_b(G) / (C E_b[G]²)        (forward)
    Var(log g_in)  = Var(log g_out) + Var_b(H) / (C E_b[H]²)       (backward)

and right after the weight layer, before ``f``, ``Var_b(b²) / (C E[b² + v²]²) = 2ξ² / C``. For a
fully-connected ReLU net (ξ = 1) the forward term is 5/C, Hanin & Rolnick's (2018) result. Normalization
layers divide each channel by its own scale and so reset the scatter to zero.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from initscope.stats.dist import DTYPE

_NODES = 48


@lru_cache(maxsize=1)
def _hermite() -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilists' Gauss–Hermite nodes and weights normalized to the N(0, 1) measure."""
    x, w = np.polynomial.hermite_e.hermegauss(_NODES)
    return torch.tensor(x, dtype=DTYPE), torch.tensor(w / w.sum(), dtype=DTYPE)


def channel_scatter(
    fn: Callable[[torch.Tensor], torch.Tensor],
    deriv: Callable[[torch.Tensor], torch.Tensor],
    xi: float,
    scale: float = 1.0,
) -> tuple[float, float]:
    """``(Var G / E[G]², Var H / E[H]²)`` for one channel, before dividing by the channel count.

    ``xi`` is the shared (offset) fraction of the pre-activation's second moment ``scale²``.
    """
    xi = min(max(xi, 0.0), 1.0)
    if xi <= 1e-12:
        return 0.0, 0.0
    z, w = _hermite()
    b = math.sqrt(xi) * scale * z
    v = math.sqrt(max(1.0 - xi, 0.0)) * scale * z
    grid = b.unsqueeze(1) + v.unsqueeze(0)  # offsets along rows, within-channel noise along columns
    f2 = fn(grid) ** 2
    d2 = deriv(grid) ** 2
    g = (f2 * w).sum(1)
    h = (d2 * w).sum(1)
    return _relative_var(g, w), _relative_var(h, w)


def _relative_var(values: torch.Tensor, w: torch.Tensor) -> float:
    mean = float((values * w).sum())
    if not mean > 0:
        return 0.0
    var = float(((values / mean - 1.0) ** 2 * w).sum())  # relative first: no underflow for tiny scales
    return var if math.isfinite(var) else 0.0


def offset_scatter(xi: float) -> float:
    """``Var(b²)/E[q]² = 2ξ²`` for a Gaussian channel offset holding the share ξ: before any activation."""
    xi = min(max(xi, 0.0), 1.0)
    return 2.0 * xi * xi


def combine(logvars: Sequence[float], shares: Sequence[float]) -> float:
    """``Var(log Σ a_i)`` for summands that inherit a common scatter and add their own on top.

    The smallest ``Var(log a_i)`` is taken as shared by all (the branches of a residual block
    inherit the scatter of its input); each summand's excess enters weighted by its share squared.
    """
    if not logvars:
        return 0.0
    base = min(logvars)
    total = sum(shares)
    if total <= 0:
        return base
    return base + sum((s / total) ** 2 * (v - base) for v, s in zip(logvars, shares))


def typical(mean: float, logvar: float) -> float:
    """The geometric-mean (median) second moment of a draw whose mean is ``mean``."""
    return mean * math.exp(-0.5 * logvar)
