"""Discrete one-dimensional distributions: the marginal of a tensor's elements when it is not Gaussian.

A conv or linear output is Gaussian given its input (its weights are), so most tensors need no
marginal beyond their second moment. The exceptions matter: ``relu(identity + branch)`` in a
residual net is the ReLU of a non-negative variable plus a Gaussian, and neither halves its second
moment nor passes half its gradient. :class:`Dist` carries such marginals as weighted points; every
operation (push-forward through an activation, independent sums, maxima) is exact on the points and
the result is compressed back to a fixed number of equal-mass bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch import Tensor

DTYPE = torch.float64
BINS = 512


@lru_cache(maxsize=None)
def hermite(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for the standard normal density (weights sum to 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(z, dtype=DTYPE), torch.tensor(w / w.sum(), dtype=DTYPE)


@lru_cache(maxsize=None)
def normal_grid(half_width: float = 10.0, n: int = 8000) -> tuple[Tensor, Tensor]:
    """Midpoint-rule discretization of N(0, 1) on ``[-half_width, half_width]``.

    Zero falls on a cell boundary, so integrands with a kink or a jump at 0 (ReLU, its derivative)
    are integrated piecewise-smoothly and sign probabilities are exactly symmetric.
    """
    h = 2 * half_width / n
    z = -half_width + h * (torch.arange(n, dtype=DTYPE) + 0.5)
    w = torch.exp(-0.5 * z**2)
    return z, w / w.sum()


@dataclass(frozen=True)
class Dist:
    """A discrete distribution: points ``x`` (sorted) with probabilities ``w``."""

    x: Tensor
    w: Tensor

    @staticmethod
    def of(x: Tensor, w: Tensor, bins: int = BINS) -> "Dist":
        order = torch.argsort(x)
        return Dist(x[order], w[order] / w.sum()).compress(bins)

    @staticmethod
    def gaussian(n: int = 8000) -> "Dist":
        z, w = normal_grid(n=n)
        return Dist(z, w)

    # -- moments ---------------------------------------------------------------------------------
    def expect(self, fn: Callable[[Tensor], Tensor]) -> float:
        return float((fn(self.x) * self.w).sum())

    @property
    def mean(self) -> float:
        return float((self.x * self.w).sum())

    @property
    def m2(self) -> float:
        return float((self.x**2 * self.w).sum())

    @property
    def nonneg(self) -> bool:
        return bool(self.x[0] >= 0)

    def cdf(self) -> Tensor:
        return torch.cumsum(self.w, 0).clamp(max=1.0)

    # -- transformations -------------------------------------------------------------------------
    def scale(self, a: float) -> "Dist":
        if a >= 0:
            return Dist(self.x * a, self.w)
        return Dist(torch.flip(self.x * a, (0,)), torch.flip(self.w, (0,)))

    def shift(self, b: float) -> "Dist":
        return Dist(self.x + b, self.w)

    def standardized(self) -> "Dist":
        """Scaled to unit second moment (the shape of a marginal, apart from its scale)."""
        m2 = self.m2
        return self if m2 <= 0 else self.scale(1.0 / np.sqrt(m2))

    def map(self, fn: Callable[[Tensor], Tensor], bins: int = BINS) -> "Dist":
        return Dist.of(fn(self.x), self.w, bins)

    def add_gaussian(self, std: float, bins: int = BINS, nodes: int = 24) -> "Dist":
        """Distribution of ``X + std * Z`` with Z ~ N(0, 1) independent of X."""
        if std == 0:
            return self
        z, wz = hermite(nodes)
        x = (self.x.unsqueeze(1) + std * z.unsqueeze(0)).reshape(-1)
        w = (self.w.unsqueeze(1) * wz.unsqueeze(0)).reshape(-1)
        return Dist.of(x, w, bins)

    def add(self, other: "Dist", bins: int = BINS) -> "Dist":
        """Distribution of ``X + Y`` for independent X (self) and Y (other)."""
        a, b = self.compress(128), other.compress(128)
        x = (a.x.unsqueeze(1) + b.x.unsqueeze(0)).reshape(-1)
        w = (a.w.unsqueeze(1) * b.w.unsqueeze(0)).reshape(-1)
        return Dist.of(x, w, bins)

    @staticmethod
    def mixture(parts: list["Dist"], weights: list[float], bins: int = BINS) -> "Dist":
        total = float(sum(weights))
        x = torch.cat([p.x for p in parts])
        w = torch.cat([p.w * (wt / total) for p, wt in zip(parts, weights)])
        return Dist.of(x, w, bins)

    def maximum(self, count: int) -> "Dist":
        """Distribution of the largest of ``count`` independent draws: the CDF raised to that power."""
        if count == 1:
            return self
        cdf = self.cdf()
        prev = torch.cat([cdf.new_zeros(1), cdf[:-1]])
        return Dist(self.x, (cdf**count - prev**count).clamp(min=0.0))

    def compress(self, bins: int = BINS) -> "Dist":
        """Reduce to about ``bins`` points, keeping the mean and second moment exactly.

        Negative, zero and positive points are compressed apart, so the probability of each sign
        (what a ReLU mask sees) is kept exactly. Within a sign, points fall into equal-mass bins; each
        bin becomes two points with the bin's mass, mean and variance, both inside the bin's range.
        """
        if self.x.numel() <= bins:
            return self
        parts_x, parts_w = [], []
        total = float(self.w.sum())
        for mask in (self.x < 0, self.x == 0, self.x > 0):
            x, w = self.x[mask], self.w[mask]
            if x.numel() == 0:
                continue
            n = max(1, int(round(bins * float(w.sum()) / total / 2)))
            if x.numel() <= 2 * n:
                parts_x.append(x)
                parts_w.append(w)
                continue
            cum = torch.cumsum(w, 0) / w.sum()
            idx = ((cum - 0.5 * w / w.sum()) * n).long().clamp(0, n - 1)
            mass = torch.zeros(n, dtype=DTYPE).index_add_(0, idx, w)
            mean = torch.zeros(n, dtype=DTYPE).index_add_(0, idx, w * x)
            sq = torch.zeros(n, dtype=DTYPE).index_add_(0, idx, w * x * x)
            lo = torch.full((n,), float("inf"), dtype=DTYPE).scatter_reduce(0, idx, x, "amin")
            keep = mass > 0
            mass, mean, sq, lo = mass[keep], mean[keep] / mass[keep], sq[keep] / mass[keep], lo[keep]
            var = (sq - mean**2).clamp(min=0.0)
            sd = var.sqrt()
            # Symmetric two points where they stay in range, else one at the bin's minimum.
            sym = mean - sd >= lo
            gap = (mean - lo).clamp(min=1e-300)
            hi_pt = torch.where(sym, mean + sd, mean + var / gap)
            lo_pt = torch.where(sym, mean - sd, lo)
            p_hi = torch.where(sym, torch.full_like(mean, 0.5), gap / (hi_pt - lo_pt).clamp(min=1e-300))
            p_hi = torch.where(var > 0, p_hi, torch.ones_like(p_hi))
            parts_x += [lo_pt, hi_pt]
            parts_w += [mass * (1 - p_hi), mass * p_hi]
        x, w = torch.cat(parts_x), torch.cat(parts_w)
        keep = w > 0
        order = torch.argsort(x[keep])
        return Dist(x[keep][order], w[keep][order])
