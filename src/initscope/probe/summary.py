"""Statistics of one tensor: moments, extremes, exact zeros, non-finite entries, quantiles, histogram.

Pure functions of a tensor (no hooks, no model). Moments, extremes and counts are exact over every
entry; quantiles and the histogram come from the sorted values themselves when the tensor holds at
most ``sample`` finite entries, and from a uniform random subsample of ``sample`` entries (drawn with
replacement) otherwise. For that subsample the Dvoretzky–Kiefer–Wolfowitz inequality (with Massart's
constant) bounds how far the reported quantiles' ranks can be from their targets:

.. math::
    P\\Big(\\sup_x |F_n(x) - F(x)| > \\varepsilon\\Big) \\le 2 e^{-2 n \\varepsilon^2},
    \\qquad \\varepsilon(n, \\alpha) = \\sqrt{\\ln(2/\\alpha) / (2 n)},

with ``F`` the empirical distribution of all the tensor's finite entries and ``F_n`` that of the
subsample, so with probability at least ``1 - α`` every reported ``q_p`` lies between the exact
``p - ε`` and ``p + ε`` quantiles of the tensor, all seven at once. At the default ``n = 2**16`` and
``α = 1e-6``, ``ε = 0.0105``; :func:`rank_error` computes it for other sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
QUANTILE_COLUMNS: tuple[str, ...] = ("q01", "q05", "q25", "q50", "q75", "q95", "q99")
DEFAULT_SAMPLE = 2**16
DEFAULT_BINS = 64


@dataclass(frozen=True)
class Stats:
    """Statistics of one tensor.

    ``count`` is the number of finite entries; ``mean``, ``var`` (population variance), ``second_moment``
    (``E[x²]``), ``min``, ``max``, the quantiles and the histogram are over those entries, ``nonfinite`` counts
    the NaN and ±inf ones and ``zero_frac`` is the fraction of all entries that are exactly zero.
    ``hist_counts`` are the counts of ``bins`` equal bins spanning ``[hist_lo, hist_hi]`` (the last bin
    closed) over the entries the quantiles were taken from: all of them when ``sampled == count``, else a
    uniform subsample of ``sampled`` entries (divide by ``sum(hist_counts)`` for frequencies).
    """

    count: int
    mean: float
    var: float
    second_moment: float
    min: float
    max: float
    q01: float
    q05: float
    q25: float
    q50: float
    q75: float
    q95: float
    q99: float
    zero_frac: float
    nonfinite: int
    hist_lo: float
    hist_hi: float
    hist_counts: tuple[int, ...] = ()
    sampled: int = field(default=0, compare=False)

    def as_row(self) -> dict:
        """The statistics as the probe table's columns (``sampled`` is not one of them)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sampled"}
        row["hist_counts"] = list(self.hist_counts)
        return row


def rank_error(n: int, alpha: float = 1e-6) -> float:
    """DKW bound on the rank error of quantiles read from ``n`` uniform draws, at confidence ``1 - alpha``.

    .. math:: \\varepsilon = \\sqrt{\\ln(2/\\alpha) / (2 n)}

    Examples:
        >>> round(rank_error(2**16), 4)
        0.0105
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


_NAN = float("nan")


def _empty(nonfinite: int, bins: int, histograms: bool) -> Stats:
    return Stats(0, _NAN, _NAN, _NAN, _NAN, _NAN, *([_NAN] * 7), zero_frac=0.0, nonfinite=nonfinite, hist_lo=_NAN, hist_hi=_NAN,
                 hist_counts=tuple([0] * bins) if histograms else (), sampled=0)


def _order_stats(values: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantiles (numpy's default rule) of already sorted values."""
    pos = np.asarray(QUANTILES) * (len(values) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(values) - 1)
    frac = pos - lo
    a, b = values[lo].astype(np.float64), values[hi].astype(np.float64)
    return a + (b - a) * frac


def _hist(values: np.ndarray, lo: float, hi: float, bins: int) -> tuple[float, float, tuple[int, ...]]:
    """Counts of sorted ``values`` in ``bins`` equal bins over ``[lo, hi]``, as ``numpy.histogram`` bins them."""
    if lo == hi:  # one value: a unit-wide range around it, as torch.histc does
        lo, hi = lo - 1.0, hi + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    below = np.searchsorted(values, edges[:-1], side="left")
    counts = np.diff(np.append(below, len(values)))
    return lo, hi, tuple(int(c) for c in counts)


_ROW = 4096


def _sums(flat: torch.Tensor) -> tuple[float, float, float, float]:
    """``(Σx, Σx², min, max)`` of a 1-d float tensor, one pass per statistic.

    ``Σx²`` is float32 dot products over 4096-entry rows, the rows' results summed in float64: a single
    float32 accumulation over ~1.7e7 entries (``torch.dot``, ``vector_norm``) is off by ~1e-3, short rows
    keep it near 1e-7; ``Σx`` is numpy's pairwise sum. On the CPU numpy does it, single-threaded: with
    other work on the cores, torch's (and BLAS's) parallel reductions cost five to ten times the time.
    """
    m = flat.numel() // _ROW * _ROW
    if flat.device.type == "cpu":
        a = flat.numpy()
        rows, tail = a[:m].reshape(-1, _ROW), a[m:]
        total = float(a.sum(dtype=a.dtype))  # numpy's pairwise summation: error ~ eps·log2(n)
        sumsq = float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64)) + float(np.dot(tail, tail))
        return total, sumsq, float(a.min()), float(a.max())
    rows, tail = flat[:m].view(-1, _ROW), flat[m:]
    total = float((rows @ torch.ones(_ROW, dtype=flat.dtype, device=flat.device)).sum(dtype=torch.float64)) + float(tail.sum())
    r3 = rows.unsqueeze(1)
    sumsq = float(torch.bmm(r3, r3.transpose(1, 2)).sum(dtype=torch.float64)) + float(torch.dot(tail, tail))
    lo, hi = torch.aminmax(flat)
    return total, sumsq, float(lo), float(hi)


def summarize(x: torch.Tensor, *, bins: int = DEFAULT_BINS, quantiles: bool = True, histograms: bool = True,
              sample: int = DEFAULT_SAMPLE, rng: np.random.Generator | None = None) -> Stats:
    """Statistics of every entry of ``x`` (see :class:`Stats`).

    Moments are single-pass sums: ``mean = Σx / n``, ``second_moment = Σx² / n`` and
    ``var = max(second_moment - mean², 0)``, summed in float64 for tensors of at most ``sample`` entries
    and above that in float32 with short accumulations (relative error ~1e-7, see ``_sums``); a tensor whose sums
    are not finite takes a float64 pass over its finite entries instead, which also counts the others.
    Quantiles and the histogram: see the module docstring for the subsample and its error bound.

    Args:
        x: any tensor (integer and half tensors are read as float32).
        bins: number of histogram bins.
        quantiles: take the quantiles (else they are NaN).
        histograms: take the histogram (else ``hist_counts`` is empty).
        sample: quantiles and histogram from at most this many entries.
        rng: the generator that draws the subsample (default: seeded with 0).

    Examples:
        >>> summarize(torch.tensor([0.0, 1.0, 2.0, float("nan")])).nonfinite
        1
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if sample < 2:
        raise ValueError(f"sample must be at least 2, got {sample}")
    x = x.detach()
    if not (x.is_floating_point() and x.dtype in (torch.float32, torch.float64)):
        x = x.float()
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return _empty(0, bins, histograms)
    cpu = flat.device.type == "cpu"

    if n <= sample:
        # Small: everything exact, in float64, from the values themselves.
        values = flat.double().cpu().numpy()
        finite = np.isfinite(values)
        nonfinite = int(n - np.count_nonzero(finite))
        if nonfinite:
            values = values[finite]
        zero_frac = float(np.count_nonzero(values == 0)) / n
        if values.size == 0:
            return _empty(nonfinite, bins, histograms)
        mean = float(values.mean())
        var = float(np.mean((values - mean) ** 2))
        second = float(np.mean(values * values))
        ordered = np.sort(values)
        return _finish(ordered, values.size, nonfinite, mean, var, second, float(ordered[0]), float(ordered[-1]),
                       zero_frac, bins, quantiles, histograms, values.size)

    total, sumsq, lo, hi = _sums(flat)
    if math.isfinite(total) and math.isfinite(sumsq):
        nonfinite = 0
        count = n
        finite_flat = flat
        mean = total / n
        second = sumsq / n
        var = max(second - mean * mean, 0.0)
    else:
        # Some entry is NaN or inf (or the float32 sum of squares overflowed): a float64 pass over the finite ones.
        mask = torch.isfinite(flat)
        finite_flat = flat[mask]
        count = finite_flat.numel()
        nonfinite = n - count
        if count == 0:
            return _empty(nonfinite, bins, histograms)
        d = finite_flat.double()
        mean = float(d.mean())
        var = float(((d - mean) ** 2).mean())
        second = float((d * d).mean())
        lo, hi = float(finite_flat.min()), float(finite_flat.max())
    if cpu:
        zeros = int(np.count_nonzero(flat.numpy() == 0))
    else:
        zeros = int((flat == 0).count_nonzero())
    zero_frac = zeros / n

    ordered = None
    k = 0
    if quantiles or histograms:
        if count <= sample:
            chosen = finite_flat.cpu().numpy()
        else:
            rng = rng if rng is not None else np.random.default_rng(0)
            idx = rng.integers(0, count, sample)
            if cpu:
                chosen = np.take(finite_flat.numpy(), idx)
            else:
                chosen = finite_flat[torch.from_numpy(idx).to(finite_flat.device)].cpu().numpy()
        ordered = np.sort(chosen)
        k = ordered.size
    return _finish(ordered, count, nonfinite, mean, var, second, lo, hi, zero_frac, bins, quantiles, histograms, k)


def _finish(ordered, count, nonfinite, mean, var, second, lo, hi, zero_frac, bins, quantiles, histograms,
            sampled) -> Stats:
    qs = _order_stats(ordered) if quantiles else np.full(len(QUANTILES), _NAN)
    if histograms:
        h_lo, h_hi, counts = _hist(ordered, lo, hi, bins)
    else:
        h_lo, h_hi, counts = lo, hi, ()
    return Stats(int(count), float(mean), float(var), float(second), float(lo), float(hi),
                 *(float(q) for q in qs), zero_frac=float(zero_frac), nonfinite=int(nonfinite),
                 hist_lo=float(h_lo), hist_hi=float(h_hi), hist_counts=counts, sampled=int(sampled))


__all__ = ["DEFAULT_BINS", "DEFAULT_SAMPLE", "QUANTILES", "QUANTILE_COLUMNS", "Stats", "rank_error", "summarize"]
