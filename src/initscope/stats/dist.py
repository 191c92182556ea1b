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
        # Stable, so that tied points (all the zeros after a ReLU) keep one order on every machine.
        x, order = torch.sort(x, stable=True)
        return Dist(x, w[order] / w.sum()).compress(bins)

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
        bin becomes two points inside the bin's range with the bin's mass, mean and variance.
        """
        if self.x.numel() <= bins:
            return self
        x, w = self.x, self.w
        total = float(w.sum())
        # The points are sorted, so each sign is a contiguous run; all three are binned in one pass,
        # each with its own bins (offset so that they never share one).
        zero = torch.zeros(1, dtype=x.dtype)
        i0 = int(torch.searchsorted(x, zero))
        i1 = int(torch.searchsorted(x, zero, right=True))
        idx_parts, binned, kept, offset = [], [], [], 0
        for lo_i, hi_i in ((0, i0), (i0, i1), (i1, x.numel())):
            count = hi_i - lo_i
            if count == 0:
                continue
            wg = w[lo_i:hi_i]
            mass = float(wg.sum())
            n = max(1, int(round(bins * mass / total / 2)))
            if count <= 2 * n:
                kept.append((x[lo_i:hi_i], wg))  # few enough points: kept as they are
                continue
            cum = torch.cumsum(wg, 0) / mass
            idx_parts.append(((cum - 0.5 * wg / mass) * n).long().clamp_(0, n - 1) + offset)
            binned.append(slice(lo_i, hi_i))
            offset += n
        if not binned:
            return Dist(torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept]))
        xb = torch.cat([x[s] for s in binned])
        wb = torch.cat([w[s] for s in binned])
        idx = torch.cat(idx_parts)
        sums = torch.zeros(3, offset, dtype=DTYPE).index_add_(1, idx, torch.stack((wb, wb * xb, wb * xb * xb)))
        lo = torch.full((offset,), float("inf"), dtype=DTYPE).scatter_reduce_(0, idx, xb, "amin")
        hi = torch.full((offset,), float("-inf"), dtype=DTYPE).scatter_reduce_(0, idx, xb, "amax")
        keep = sums[0] > 0
        mass = sums[0][keep]
        mean, sq, lo, hi = sums[1][keep] / mass, sums[2][keep] / mass, lo[keep], hi[keep]
        mean = torch.minimum(torch.maximum(mean, lo), hi)  # against rounding
        # A two-point law inside [lo, hi] with this mean and variance exists since the bin's own points
        # are one (var <= (mean - lo)(hi - mean), Bhatia-Davis): symmetric where it fits, else pinned
        # to the end it would cross. Staying inside the bin keeps each sign's mass exact.
        var = torch.minimum((sq - mean**2).clamp(min=0.0), (mean - lo) * (hi - mean))
        sd = var.sqrt()
        below, above = mean - sd < lo, mean + sd > hi
        lo_pt = torch.where(below, lo, torch.where(above, mean - var / (hi - mean).clamp(min=1e-300), mean - sd))
        hi_pt = torch.where(above, hi, torch.where(below, mean + var / (mean - lo).clamp(min=1e-300), mean + sd))
        lo_pt, hi_pt = torch.maximum(lo_pt, lo), torch.minimum(hi_pt, hi)
        width = hi_pt - lo_pt
        p_hi = torch.where(width > 0, (mean - lo_pt) / width.clamp(min=1e-300), torch.ones_like(mean))
        x_out = torch.cat((lo_pt, hi_pt, *(k[0] for k in kept)))
        w_out = torch.cat((mass * (1 - p_hi), mass * p_hi, *(k[1] for k in kept)))
        nonzero = w_out > 0
        x_out, w_out = x_out[nonzero], w_out[nonzero]
        x_out, order = torch.sort(x_out, stable=True)
        return Dist(x_out, w_out[order])
