"""Closed forms and quadratures for Gaussian inputs.

* The arc-cosine kernel of ReLU (Cho and Saul, 2009): for standard normals x, y with correlation ρ,
  ``E[relu(x) relu(y)] = (sqrt(1 - ρ²) + (π - arccos ρ) ρ) / (2π)`` and
  ``P(x > 0, y > 0) = 1/4 + arcsin(ρ) / (2π)``.
* Dual activations of any other elementwise f through its Hermite expansion:
  ``E[f(x) f(y)] = Σ_n a_n² ρⁿ`` with ``a_n = E[f(z) He_n(z)] / sqrt(n!)``.
* Maxima of T equicorrelated standard normals (correlation c):
  ``max = sqrt(c) Z + sqrt(1 - c) X_T`` where ``X_T`` has density ``T φ(m) Φ(m)^(T-1)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from initscope.stats.dist import DTYPE, Dist, hermite, normal_grid

HERMITE_TERMS = 16


def relu_cross(rho: Tensor) -> Tensor:
    """``E[relu(x) relu(y)]`` for standard normals with correlation ``rho`` (equals 1/2 at ρ = 1)."""
    rho = rho.clamp(-1.0, 1.0)
    return (torch.sqrt((1 - rho**2).clamp(min=0.0)) + (math.pi - torch.arccos(rho)) * rho) / (2 * math.pi)


def relu_mask_cross(rho: Tensor) -> Tensor:
    """``P(x > 0, y > 0)`` for standard normals with correlation ``rho``."""
    return 0.25 + torch.arcsin(rho.clamp(-1.0, 1.0)) / (2 * math.pi)


def hermite_coefficients(values: Tensor, terms: int = HERMITE_TERMS) -> Tensor:
    """Normalized Hermite coefficients of a function sampled on :func:`normal_grid` points."""
    z, w = normal_grid()
    coeffs = []
    he_prev, he = torch.zeros_like(z), torch.ones_like(z)
    for n in range(terms):
        coeffs.append(float((values * he * w).sum()) / math.sqrt(math.factorial(n)))
        he_prev, he = he, z * he - n * he_prev
    return torch.tensor(coeffs, dtype=DTYPE)


def dual_from_coefficients(coeffs: Tensor, rho: Tensor) -> Tensor:
    """``Σ_n a_n² ρⁿ``: the dual activation at correlation ``rho`` from Hermite coefficients ``a_n``."""
    out = torch.zeros_like(rho)
    power = torch.ones_like(rho)
    for a in coeffs.tolist():
        out = out + a * a * power
        power = power * rho
    return out


@lru_cache(maxsize=256)
def _max_unit(count: int) -> Dist:
    """Distribution of the largest of ``count`` independent standard normals."""
    z, w = normal_grid()
    phi_cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    w = w * count * phi_cdf ** (count - 1)
    return Dist(z, w / w.sum())


@lru_cache(maxsize=1024)
def max_of_normals(count: int, corr: float = 0.0) -> Dist:
    """Distribution of the largest of ``count`` standard normals with common correlation ``corr``."""
    corr = min(max(corr, 0.0), 1.0 - 1e-9)
    base = _max_unit(count).scale(math.sqrt(1.0 - corr))
    return base if corr == 0.0 else base.add_gaussian(math.sqrt(corr), bins=2048)


def max_conditional_mean(count: int, corr: float, fn, nodes: int = 32) -> tuple[Tensor, Tensor]:
    """``E[fn(max) | Z]`` at Gauss-Hermite nodes of the shared factor Z, with the node weights.

    Two windows that share no input have maxima that are independent given Z, so
    ``E[fn(M_a) fn(M_b)] = E_Z[E[fn(M) | Z]²]``.
    """
    corr = min(max(corr, 0.0), 1.0 - 1e-9)
    base = _max_unit(count)
    z, wz = hermite(nodes)
    x = math.sqrt(corr) * z.unsqueeze(1) + math.sqrt(1.0 - corr) * base.x.unsqueeze(0)
    return (fn(x) * base.w.unsqueeze(0)).sum(1), wz


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))
