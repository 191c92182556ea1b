"""The statistics that stand in for a tensor during propagation.

:class:`Signal` describes a forward tensor, :class:`Grad` the gradient at one. Both hold the second
moment of every element (batch dimension kept at size 1, other dimensions broadcastable), so shape
ops apply to them as they apply to the tensor. Expectations are over inputs and over weight draws.

Beyond the elementwise second moment a Signal carries what the paper's rules silently assume away:

* ``cov``: the within-channel covariance between spatial positions, ``E[x_p x_q]`` averaged over
  channels, as a ``(*spatial, *spatial)`` matrix on maps small enough to afford it. Average pooling
  needs it (ReLU outputs of a deep net are strongly correlated across positions), and so does the
  border: on a 2x2 map every position is a border and correlations are far from uniform.
* ``rho``: the same as one off-diagonal correlation, for maps too large for ``cov``.
* ``xcorr``: the correlation with elements that share no weights (other samples, other channels);
  it is the fraction of the second moment that BatchNorm's mean subtraction removes.
* ``pooled``: the fraction of the second moment carried by each channel's mean over samples *and
  positions*, which is what a BatchNorm subtracts; None when it is ``xcorr``. A conv on a small
  padded map makes it smaller than ``xcorr``: each position's offset is made of other taps.
* ``dist``: the standardized marginal when it is not a zero-mean Gaussian.
* ``act``/``pre``: for ``f(u)`` with u Gaussian, the activation and the Signal of u, which max pooling
  needs (the max of ``relu(u_i)`` is ``relu(max u_i)``).
* ``hidden``: the spatial statistics of a tensor whose layout hides its spatial dims (see
  :class:`Hidden`); None when ``shape[2:]`` are the spatial dims, as they are almost everywhere.
* ``parts``: for a concatenation over channels, the Signals of its blocks, in channel order. The
  fields above describe the whole tensor (a mixture of the blocks), which is all a conv needs: its
  output mixes every channel. An op that treats channels apart (a BatchNorm subtracts each channel's
  own mean; an activation maps each block's own marginal) reads the blocks instead. DenseNet
  concatenates a max-pooled ReLU map (mean share ~0.85) with fresh conv outputs (~0.3): one share
  for all channels misses each block's by up to a bit, and the error compounds through the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from initscope.stats.dist import DTYPE, Dist
from initscope.stats.fluctuation import combine

if TYPE_CHECKING:
    from initscope.stats.elementwise import Activation


def spatial_shape(shape: torch.Size) -> torch.Size:
    """The spatial dims of an ``(N, C, *spatial)`` tensor; empty for ``(N, C)``."""
    return torch.Size(shape[2:]) if len(shape) >= 3 else torch.Size()


def channel_map(m2: Tensor, shape: torch.Size) -> Tensor:
    """Average of an elementwise map over batch and channels: one value per spatial position."""
    m = m2
    while m.ndim < len(shape):
        m = m.unsqueeze(0)
    if len(shape) >= 2:
        m = m.mean(dim=(0, 1))
    elif len(shape) == 1:
        m = m.mean(dim=0)
    return m.expand(spatial_shape(shape))


def cat_maps(maps: list[Tensor], shapes: list[torch.Size], dim: int) -> Tensor:
    """Concatenate elementwise maps along ``dim``, left broadcast along every other dim where all are.

    ``torch.cat`` of the fully expanded maps would turn a few channel-uniform blocks into a
    ``(1, C, H, W)`` map that every later op pays for.
    """
    ms = [compact(m, s) for m, s in zip(maps, shapes)]
    ndim = len(shapes[0])
    size = [1] * ndim
    for m, s in zip(ms, shapes):
        for i in range(ndim):
            if i != dim and m.shape[i] > 1:
                size[i] = s[i]
    parts = []
    for m, s in zip(ms, shapes):
        size[dim] = s[dim]
        parts.append(m.expand(size))
    return torch.cat(parts, dim=dim)


def channel_blocks(x: "Signal") -> list[tuple[int, int, "Signal"]]:
    """``(first channel, channel count, Signal)`` of each block of a channel concatenation."""
    if x.parts is None:
        return [(0, int(x.shape[1]), x)]
    out, start = [], 0
    for p in x.parts:
        n = int(p.shape[1])
        out.append((start, n, p))
        start += n
    return out


def matched_cov(cov: Tensor, m2: Tensor, shape: torch.Size) -> Tensor:
    """``cov`` rescaled, correlations kept, so that its diagonal is the channel average of ``m2``.

    A rule that scales each channel by its own factor (a BatchNorm over a concatenation, a ReLU whose
    blocks pass different shares) changes the channel-averaged map by the average of the products,
    not by the product of the averages; rules downstream (average pooling) read the covariance's
    diagonal as that map.
    """
    d = int(torch.Size(spatial_shape(shape)).numel())
    k = cov.reshape(d, d)
    target = channel_map(m2, shape).reshape(d)
    current = k.diagonal()
    f = torch.where(current > 0, (target / current.clamp(min=1e-300)).sqrt(), torch.zeros_like(current))
    return (k * torch.outer(f, f)).reshape(cov.shape)


@dataclass(frozen=True, eq=False)
class Hidden:
    """Spatial statistics kept across a reshape that hides the spatial dims.

    Rules read a tensor as ``(N, C, *spatial)``. A channel shuffle views ``(N, C, H, W)`` as
    ``(N, g, C/g, H, W)``, transposes the two channel dims and views back: in between, ``shape[2:]``
    is no longer the map, but the last ``len(spatial)`` dims still are, position for position. The
    covariance (or the one correlation) of those dims is carried here until a shape op gives the
    tensor its ordinary layout back. Without it ShuffleNetV2 lost every map's covariance at each of its
    16 shuffles, and its classifier after the global mean was predicted 0.87 bits low.
    """

    spatial: torch.Size
    cov: Tensor | None
    rho: float

    def scaled(self, factor: float) -> "Hidden":
        return Hidden(self.spatial, None if self.cov is None else self.cov * factor, self.rho)


def compact(m2: Tensor, shape: torch.Size) -> Tensor:
    """A second-moment tensor with the tensor's number of dims, left broadcastable."""
    m = torch.as_tensor(m2, dtype=DTYPE)
    while m.ndim < len(shape):
        m = m.unsqueeze(0)
    return m


class _once:
    """``functools.cached_property`` without its lock (Python < 3.12 takes one on every first read,
    and a propagation makes ~700 first reads); Signals and Grads are never shared between threads
    while they are built."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@lru_cache(maxsize=64)
def uniform_map(value: float, ndim: int) -> Tensor:
    """A one-element map of ``ndim`` dims, shared: the paper's model makes one per weight layer and
    pass, and no rule writes a map in place."""
    return torch.full((1,) * ndim, value, dtype=DTYPE)


def shrink(m: Tensor) -> Tensor:
    """``m`` with every dim along which it is constant cut to size 1 (still broadcasts to the same map).

    Rules that run the real op on a materialized map (reshapes, their vector-Jacobian products) hand
    back full-size maps; shrinking them keeps later rules working on one value per position instead of
    one per (channel, position).
    """
    for dim in range(m.ndim):
        if m.shape[dim] > 1:
            first = m.narrow(dim, 0, 1)
            if torch.equal(m, first.expand_as(m)):
                m = first
    return m


def mean_of(m2: Tensor) -> float:
    """Mean over the tensor's elements; a broadcast (size-1) dim averages the same as its expansion."""
    # A propagation asks this ~1500 times, mostly of one-element maps: reading the element costs a
    # fifteenth of a torch reduction, and sum over count half of torch's mean.
    n = m2.numel()
    return float(m2) if n == 1 else float(m2.sum()) / n


def _evolve(obj: Any, changes: dict[str, Any], reads_m2: tuple[str, ...]) -> Any:
    """``dataclasses.replace`` for the propagation's frozen values, without re-running ``__init__``.

    A propagation makes ~750 such copies; ``replace`` costs 14 µs each. The cached ``mean_m2`` is kept
    unless a field it reads changes.
    """
    new = object.__new__(type(obj))
    state = new.__dict__
    state.update(obj.__dict__)
    state.update(changes)
    if "mean_m2" in state and any(k in changes for k in reads_m2):
        del state["mean_m2"]
    return new


def _equicorrelated(m: Tensor, rho: float, spatial: torch.Size) -> Tensor:
    """The spatial covariance with the map ``m`` on its diagonal and correlation ``rho`` elsewhere."""
    d = int(spatial.numel())
    s = m.reshape(d).sqrt()
    # An equicorrelation below -1/(d-1) is no covariance at all (its mean would be negative).
    rho = max(rho, -1.0 / (d - 1)) if d > 1 else rho
    k = rho * torch.outer(s, s)
    k.diagonal().copy_(s**2)
    return k.reshape(*spatial, *spatial)


def mean_corr_of(cov: Tensor | None, positions: int, rho: float) -> float:
    """Average correlation between two distinct positions of a covariance (``rho`` when there is none)."""
    if cov is None or positions < 2:
        return rho
    k = cov.reshape(positions, positions)
    s = k.diagonal().clamp(min=1e-300).sqrt()
    c = k / torch.outer(s, s)
    return float((c.sum() - c.diagonal().sum()) / (positions * positions - positions))


@dataclass(frozen=True, eq=False)
class Signal:
    """Forward statistics of one tensor."""

    shape: torch.Size
    m2: Tensor
    cov: Tensor | None = None
    rho: float = 0.0
    xcorr: float = 0.0
    dist: Dist | None = None
    const: Tensor | None = None
    act: "Activation | None" = None
    pre: "Signal | None" = None
    # Finite width (see initscope.stats.fluctuation): Var(log q) over weight draws, and, right after a
    # weight layer, its channel count and the scatter it inherited.
    logvar: float = 0.0
    fresh: int = 0
    base_logvar: float = 0.0
    pooled: float | None = None
    parts: "tuple[Signal, ...] | None" = None
    hidden: Hidden | None = None

    @staticmethod
    def unit(shape: torch.Size, m2: float = 1.0) -> "Signal":
        """Independent zero-mean Gaussian elements of second moment ``m2``."""
        return Signal(torch.Size(shape), uniform_map(float(m2), len(shape)))

    @staticmethod
    def constant(value: Tensor) -> "Signal":
        v = value.detach().to("cpu", DTYPE)
        shape = torch.Size(v.shape)
        return Signal(shape, v**2, const=v)

    @property
    def spatial(self) -> torch.Size:
        return spatial_shape(self.shape)

    @property
    def positions(self) -> int:
        return int(torch.Size(self.spatial).numel())

    @_once
    def mean_m2(self) -> float:
        # Cached: Signals are immutable and rules ask for this many times.
        return mean_of(self.m2)

    @property
    def gaussian(self) -> bool:
        return self.dist is None

    @property
    def mean_fraction(self) -> float:
        """``E[x] / sqrt(E[x^2])`` of the marginal."""
        return 0.0 if self.dist is None else self.dist.mean

    @property
    def nonneg(self) -> bool:
        return self.dist is not None and self.dist.nonneg

    def channel_map(self) -> Tensor:
        return channel_map(self.m2, self.shape)

    def full(self) -> Tensor:
        """The full spatial covariance, built from ``rho`` when only that is known."""
        return self.cov if self.cov is not None else _equicorrelated(self.channel_map(), self.rho, self.spatial)

    def mean_corr(self) -> float:
        """Average correlation between two distinct positions of one channel."""
        return mean_corr_of(self.cov, self.positions, self.rho)

    def with_(self, **changes: Any) -> "Signal":
        if self.parts is not None and "parts" not in changes and not _KEEPS_PARTS.issuperset(changes):
            # The blocks no longer describe the tensor once its statistics change.
            changes["parts"] = None
        return _evolve(self, changes, ("m2",))

    def scaled(self, factor: float) -> "Signal":
        """The statistics of ``a * x`` where ``a**2 == factor``."""
        pre = None if self.pre is None else self.pre.scaled(factor)
        return self.with_(
            m2=self.m2 * factor,
            cov=None if self.cov is None else self.cov * factor,
            pre=pre if self.act is not None and self.act.homogeneous else None,
            act=self.act if self.act is not None and self.act.homogeneous else None,
            parts=None if self.parts is None else tuple(p.scaled(factor) for p in self.parts),
            hidden=None if self.hidden is None else self.hidden.scaled(factor),
        )


# Fields a change of which leaves a Signal's blocks valid.
_KEEPS_PARTS = frozenset(("logvar", "fresh", "base_logvar", "act", "pre"))


@dataclass(frozen=True, eq=False)
class Grad:
    """Backward statistics: the second moment of the gradient at each element of a tensor.

    ``pre`` holds the part that a max pool already took through the activation in front of it (its
    argmax is where that activation is positive, so the two cannot be treated apart); the
    activation's own backward adds it without applying its derivative again.
    ``cov`` is the gradient's spatial covariance on small maps; on maps too large for it, ``rho`` is
    its average correlation between two distinct positions of one channel, as for a :class:`Signal`.
    A global pool sends every position the same gradient, and convolutions keep that correlation: a
    squeeze-excitation gate's gradient ``Σ_p g_p x_p`` is made mostly of the cross-position terms.
    """

    shape: torch.Size
    m2: Tensor
    cov: Tensor | None = None
    pre: Tensor | None = None
    logvar: float = 0.0
    # Set by a ReLU's backward: the Signal whose mask this whole gradient went through. A sum that
    # feeds the ReLU and has a ReLU output among its summands (an identity shortcut) uses it: the two
    # masks are correlated, and where the summand is zero its own ReLU passes nothing.
    masked_by: "Signal | None" = None
    # Gradient that sits where the activation producing this tensor is inactive: it is measured here,
    # but that activation's backward passes none of it.
    dead: Tensor | None = None
    rho: float = 0.0
    hidden: Hidden | None = None

    @staticmethod
    def unit(shape: torch.Size, m2: float = 1.0) -> "Grad":
        return Grad(torch.Size(shape), uniform_map(float(m2), len(shape)))

    @property
    def spatial(self) -> torch.Size:
        return spatial_shape(self.shape)

    @property
    def positions(self) -> int:
        return int(torch.Size(self.spatial).numel())

    def total(self) -> Tensor:
        """The gradient's second moment at this tensor, all parts."""
        return self.live() if self.dead is None else self.live() + self.dead

    def live(self) -> Tensor:
        """The part an activation in front of this tensor can pass."""
        return self.m2 if self.pre is None else self.m2 + self.pre

    @_once
    def mean_m2(self) -> float:
        return mean_of(self.total())

    def with_(self, **changes: Any) -> "Grad":
        return _evolve(self, changes, ("m2", "pre", "dead"))

    def channel_map(self) -> Tensor:
        return channel_map(self.m2, self.shape)

    def full(self) -> Tensor:
        """The full spatial covariance, built from ``rho`` when only that is known."""
        return self.cov if self.cov is not None else _equicorrelated(self.channel_map(), self.rho, self.spatial)

    def mean_corr(self) -> float:
        """Average correlation between the gradients at two distinct positions of one channel."""
        return mean_corr_of(self.cov, self.positions, self.rho)

    def scaled(self, factor: float) -> "Grad":
        return Grad(
            self.shape,
            self.m2 * factor,
            None if self.cov is None else self.cov * factor,
            None if self.pre is None else self.pre * factor,
            self.logvar,
            self.masked_by,
            None if self.dead is None else self.dead * factor,
            self.rho,
            None if self.hidden is None else self.hidden.scaled(factor),
        )

    def __add__(self, other: "Grad") -> "Grad":
        cov = None
        if self.cov is not None or other.cov is not None:
            cov = self.full() + other.full()
        pre = self.pre if other.pre is None else (other.pre if self.pre is None else self.pre + other.pre)
        weights = [self.mean_m2, other.mean_m2]
        logvar = combine([self.logvar, other.logvar], weights)
        dead = self.dead if other.dead is None else (other.dead if self.dead is None else self.dead + other.dead)
        # The off-diagonal second moments add as the diagonal ones do (cross terms between the two
        # are left out of both, as in m2).
        total = sum(weights)
        rho = (self.rho * weights[0] + other.rho * weights[1]) / total if total > 0 else 0.0
        return Grad(self.shape, self.m2 + other.m2, cov, pre, logvar, dead=dead, rho=rho,
                    hidden=_add_hidden(self.hidden, other.hidden, weights))


def _add_hidden(a: Hidden | None, b: Hidden | None, weights: list[float]) -> Hidden | None:
    """The hidden spatial statistics of a sum of two gradients (kept only when both carry them)."""
    if a is None or b is None or a.spatial != b.spatial:
        return None
    total = sum(weights)
    rho = (a.rho * weights[0] + b.rho * weights[1]) / total if total > 0 else 0.0
    cov = None if a.cov is None or b.cov is None else a.cov + b.cov
    return Hidden(a.spatial, cov, rho)
