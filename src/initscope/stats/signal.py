"""The statistics that stand in for a tensor during propagation.

:class:`Signal` describes a forward tensor, :class:`Grad` the gradient at one. Both hold the second
moment of every element, ``m2`` (batch dimension kept at size 1, other dimensions broadcastable), so
shape ops apply to it as they apply to the tensor. Expectations are over inputs and over weight draws.

Beyond ``m2`` a Signal carries what the paper's rules silently assume away, in named parts. Each is
a small frozen record whose docstring says what it describes and which ops keep it:

* ``layout`` (:class:`Layout`): which dim is the channel and which dims are the positions a kernel
  or a pool slides over; ``(N, C, *spatial)`` unless a rule says otherwise.
* ``spatial`` (:class:`Spatial`, shared with :class:`Grad`): how the positions of one channel
  co-vary (a covariance on small maps, one correlation on large ones, and what a reshape hides).
* ``shared`` (:class:`Shared`): the part of the second moment that elements sharing no weights have
  in common, which is what a BatchNorm's mean subtraction removes.
* ``dist`` (a :class:`~initscope.stats.dist.Dist`): the standardized marginal when it is not a
  zero-mean Gaussian. It is scale-free and blind to positions, so every ``with_`` keeps it; a rule
  that changes the values' distribution sets it.
* ``activated`` (:class:`Activated`): for ``x = f(u)``, f and the Signal of u.
* ``blocks`` (:class:`Blocks`): for a concatenation over channels, the Signals of its blocks.
* ``scatter`` (:class:`Scatter`): the finite-width scatter over weight draws.
* ``const``: the value itself, for a graph constant (a parameter a rule reads, a literal).

``with_(**changes)`` copies a Signal or a Grad with some fields replaced. A record names, in its
``invalidated_by``, the fields it is computed from; when one of those changes and the record is not
given anew in the same call, ``with_`` drops it (to None, or to the record's empty value): a rule
that changes a tensor's second moment without restating its covariance gets a Signal without one,
not a Signal with a stale one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from initscope.stats.dist import DTYPE, Dist
from initscope.stats.fluctuation import combine

if TYPE_CHECKING:
    from initscope.stats.elementwise import Activation


# -- the parts -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Layout:
    """Which dim of a tensor is its channel and which dims are its positions.

    The channel is what a weight layer mixes (and a BatchNorm normalizes one by one); the positions
    are what a kernel or a pool slides over, and what :class:`Spatial` correlates. ``spatial=None``
    is the ``(N, C, *spatial)`` convention: channel 1, positions every dim after it (none for
    ``(N, C)``). A token tensor ``(N, L, E)`` is ``Layout(channel=-1, spatial=(1,))``.

    :attr:`Signal.positions`, :func:`channel_map`, :func:`matched_cov` and :func:`channel_blocks`
    read it; most rules still assume the ``(N, C, *spatial)`` layout. Elementwise ops, sums,
    products, concatenations, dropout and normalizations keep their input's layout; weight layers,
    pools, shape ops and ops without a rule give their output the ``(N, C, *spatial)`` one. The pass
    gives a gradient the layout of the tensor it is at.
    """

    channel: int = 1
    spatial: tuple[int, ...] | None = None

    def spatial_shape(self, shape: torch.Size) -> torch.Size:
        """The sizes of the position dims of a tensor of this shape."""
        if self.spatial is None:
            return torch.Size(shape[2:]) if len(shape) >= 3 else torch.Size()
        return torch.Size(shape[d] for d in self.spatial)

    def channel_dim(self, ndim: int) -> int:
        return self.channel % ndim

    def averaged_dims(self, ndim: int) -> tuple[int, ...]:
        """The dims that are not positions (batch, channel, any other): what a channel map averages."""
        if self.spatial is None:
            return _FIRST_DIMS[min(ndim, 2)]
        positions = {d % ndim for d in self.spatial}
        return tuple(d for d in range(ndim) if d not in positions)


_FIRST_DIMS = ((), (0,), (0, 1))


CHANNELS_FIRST = Layout()


@dataclass(frozen=True, eq=False, slots=True)
class Hidden:
    """Spatial statistics kept across a reshape that hides the positions.

    Rules read a tensor as ``(N, C, *spatial)``. A channel shuffle views ``(N, C, H, W)`` as
    ``(N, g, C/g, H, W)``, transposes the two channel dims and views back: in between, ``shape[2:]``
    is no longer the map, but the last ``len(shape)`` dims of the tensor still are, position for
    position. The covariance (or the one correlation) of those dims is carried here until a shape op
    gives the tensor its ordinary layout back. Without it ShuffleNetV2 lost every map's covariance
    at each of its 16 shuffles, and its classifier after the global mean was predicted 0.87 bits low.
    """

    shape: torch.Size  # the hidden positions' sizes
    cov: Tensor | None
    rho: float

    def scaled(self, factor: float) -> "Hidden":
        return Hidden(self.shape, None if self.cov is None else self.cov * factor, self.rho)


@dataclass(frozen=True, eq=False, slots=True)
class Spatial:
    """How the positions of one channel co-vary: a Signal's values, or a Grad's gradients.

    * ``cov``: ``E[x_p x_q]`` averaged over channels, a ``(*positions, *positions)`` matrix, on maps
      small enough to afford it. Average pooling needs it (ReLU outputs of a deep net are strongly
      correlated across positions), and so does the border: on a 2x2 map every position is a border
      and correlations are far from uniform. Its diagonal is the channel map of ``m2``.
    * ``rho``: the same as one off-diagonal correlation, for maps too large for ``cov``.
    * ``hidden``: the statistics of a tensor whose layout hides its positions (see :class:`Hidden`);
      None when the layout's positions are the map, as they are almost everywhere.

    The empty record (no covariance, ``rho`` 0) says that positions are uncorrelated. Ops that keep
    every element at its position keep it (identities, a factor: ``scaled``, shape ops that keep the
    positions); the others compute it anew. It is in units of ``m2`` over the layout's positions, so
    ``with_`` drops it when the shape, the layout or ``m2`` changes without it.
    """

    invalidated_by: ClassVar[frozenset[str]] = frozenset({"shape", "layout", "m2"})

    cov: Tensor | None = None
    rho: float = 0.0
    hidden: Hidden | None = None

    def scaled(self, factor: float) -> "Spatial":
        """The statistics of ``a * x`` where ``a**2 == factor``."""
        if self.cov is None and self.hidden is None:
            return self
        return Spatial(None if self.cov is None else self.cov * factor, self.rho,
                       None if self.hidden is None else self.hidden.scaled(factor))

    def without_hidden(self) -> "Spatial":
        """The statistics of the layout's own positions only (what an op that cannot see hidden
        positions passes on)."""
        return self if self.hidden is None else Spatial(self.cov, self.rho)


@dataclass(frozen=True, slots=True)
class Shared:
    """The part of the second moment that elements sharing no weights have in common.

    * ``xcorr``: the correlation with elements that share no weights (other samples, other
      channels); the fraction of the second moment that BatchNorm's mean subtraction removes.
    * ``pooled``: the fraction carried by each channel's mean over samples *and positions*, which is
      what a BatchNorm subtracts; None when it is ``xcorr``. A conv on a small padded map makes it
      smaller than ``xcorr``: each position's offset is made of other taps.

    Both are shares of the second moment, so a factor on the whole tensor keeps them (``scaled``)
    and so do ops that move elements without mixing them; sums, products, pools and activations
    compute them anew, and a normalization sets them to what its bias leaves. Which elements share
    a sample or a channel depends on the shape and the layout: ``with_`` drops the record (to no
    shared part) when either changes without it.
    """

    invalidated_by: ClassVar[frozenset[str]] = frozenset({"shape", "layout"})

    xcorr: float = 0.0
    pooled: float | None = None

    @property
    def batch_mean(self) -> float:
        """The share in each channel's mean over samples and positions (``pooled``, else ``xcorr``)."""
        return self.xcorr if self.pooled is None else self.pooled


@dataclass(frozen=True, eq=False, slots=True)
class Activated:
    """This tensor is ``f(u)``, f an elementwise monotone function: ``f`` and ``pre``, the Signal of u.

    Max pooling reads it (the max of ``relu(u_i)`` is ``relu(max u_i)``), and so does a sum's
    gradient that went through a ReLU (the mask of a ReLU output among the summands). Set by
    activations and by a concatenation of outputs of one f; kept by ops that leave the values as
    they are, and through a positive factor when f is positively homogeneous (``scaled``). ``with_``
    drops it when the values change without it (their shape, layout, second moment, marginal, or a
    constant's value).
    """

    invalidated_by: ClassVar[frozenset[str]] = frozenset({"shape", "layout", "m2", "dist", "const"})

    f: "Activation"
    pre: "Signal"

    def scaled(self, factor: float) -> "Activated | None":
        """The record of ``a * x`` where ``a**2 == factor`` (None unless f is positively homogeneous)."""
        return Activated(self.f, self.pre.scaled(factor)) if self.f.homogeneous else None


@dataclass(frozen=True, eq=False, slots=True)
class Blocks:
    """The Signals of a channel concatenation's blocks, in channel order (``parts``).

    The other fields of a Signal describe the whole tensor (a mixture of the blocks), which is all a
    conv needs: its output mixes every channel. An op that treats channels apart (a BatchNorm
    subtracts each channel's own mean; an activation maps each block's own marginal) reads the
    blocks instead. DenseNet concatenates a max-pooled ReLU map (mean share ~0.85) with fresh conv
    outputs (~0.3): one share for all channels misses each block's by up to a bit, and the error
    compounds through the block.

    Set by a concatenation over channels; a factor keeps it (``scaled``), and so do ops that change
    only the activation record or the scatter. ``with_`` drops it on any other change: the blocks no
    longer describe the tensor once its statistics change.
    """

    invalidated_by: ClassVar[frozenset[str]] = frozenset(
        {"shape", "layout", "m2", "dist", "const", "spatial", "shared"})

    parts: "tuple[Signal, ...]"

    def scaled(self, factor: float) -> "Blocks":
        return Blocks(tuple(p.scaled(factor) for p in self.parts))


@dataclass(frozen=True, slots=True)
class Scatter:
    """Finite width (see :mod:`initscope.stats.fluctuation`): how one weight draw scatters.

    * ``logvar``: ``Var(log q)`` over weight draws, q the second moment (of a gradient, for a Grad).
    * ``fresh``: right after a weight layer, its channel count (0 elsewhere);
    * ``base_logvar``: right after a weight layer, the scatter it inherited from its input.

    A Grad carries only ``logvar``. The pass sets it at weight layers; ops that mix no channels with
    weights of their own keep it, or combine their inputs' (``Rule.fluctuation``); a normalization
    resets it, and an activation right after a weight layer adds its channel offsets' share. It is
    over weight draws, not a statistic of the values, so no change in ``with_`` drops it.
    """

    invalidated_by: ClassVar[frozenset[str]] = frozenset()

    logvar: float = 0.0
    fresh: int = 0
    base_logvar: float = 0.0


UNCORRELATED = Spatial()
NO_SHARE = Shared()
NO_SCATTER = Scatter()


# -- maps ------------------------------------------------------------------------------------------
def channel_map(m2: Tensor, shape: torch.Size, layout: Layout = CHANNELS_FIRST) -> Tensor:
    """Average of an elementwise map over every dim but the positions: one value per position."""
    m = m2
    while m.ndim < len(shape):
        m = m.unsqueeze(0)
    dims = layout.averaged_dims(len(shape))
    if dims:
        m = m.mean(dim=dims)
    return m.expand(layout.spatial_shape(shape))


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
    c = x.layout.channel_dim(len(x.shape))
    if x.blocks is None:
        return [(0, int(x.shape[c]), x)]
    out, start = [], 0
    for p in x.blocks.parts:
        n = int(p.shape[c])
        out.append((start, n, p))
        start += n
    return out


def matched_cov(cov: Tensor, m2: Tensor, shape: torch.Size, layout: Layout = CHANNELS_FIRST) -> Tensor:
    """``cov`` rescaled, correlations kept, so that its diagonal is the channel average of ``m2``.

    A rule that scales each channel by its own factor (a BatchNorm over a concatenation, a ReLU whose
    blocks pass different shares) changes the channel-averaged map by the average of the products,
    not by the product of the averages; rules downstream (average pooling) read the covariance's
    diagonal as that map.
    """
    d = int(layout.spatial_shape(shape).numel())
    k = cov.reshape(d, d)
    target = channel_map(m2, shape, layout).reshape(d)
    current = k.diagonal()
    f = torch.where(current > 0, (target / current.clamp(min=1e-300)).sqrt(), torch.zeros_like(current))
    return (k * torch.outer(f, f)).reshape(cov.shape)


def compact(m2: Tensor, shape: torch.Size) -> Tensor:
    """A second-moment tensor with the tensor's number of dims, left broadcastable."""
    m = torch.as_tensor(m2, dtype=DTYPE)
    while m.ndim < len(shape):
        m = m.unsqueeze(0)
    return m


class _once:
    """``functools.cached_property`` without its lock (Python < 3.12 takes one on every first read,
    and a propagation makes hundreds: docs/theory.md, "Planning speed"); Signals and Grads are never
    shared between threads while they are built."""

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
    # Asked of nearly every map a rule touches, mostly one-element ones: reading the element is much
    # cheaper than a torch reduction, and sum over count than torch's mean (docs/theory.md,
    # "Planning speed").
    n = m2.numel()
    return float(m2) if n == 1 else float(m2.sum()) / n


# -- copies ----------------------------------------------------------------------------------------
def _parts_table(*parts: tuple[str, type, Any]) -> tuple[tuple[str, frozenset[str], Any], ...]:
    """``(field, invalidated_by, empty value)`` of the records some change can invalidate, in an order
    where a record comes after those whose drop invalidates it."""
    return tuple((name, cls.invalidated_by, empty) for name, cls, empty in parts if cls.invalidated_by)


def _evolve(obj: Any, changes: dict[str, Any], parts: tuple, reads_m2: tuple[str, ...]) -> Any:
    """``dataclasses.replace`` for the propagation's frozen values, without re-running ``__init__``
    (a propagation makes many copies, and ``replace`` costs more than the rules' arithmetic on
    one-element maps: docs/theory.md, "Planning speed").

    A record that a changed field invalidates is dropped unless ``changes`` gives it anew. The cached
    ``mean_m2`` is kept unless a field it reads changes.
    """
    for name, invalidated_by, empty in parts:
        if name not in changes and not invalidated_by.isdisjoint(changes) and getattr(obj, name) is not empty:
            changes[name] = empty
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


# -- the two values --------------------------------------------------------------------------------
class _Positions:
    """What a Signal and a Grad read alike from their shape, layout, ``m2`` and spatial part."""

    shape: torch.Size
    m2: Tensor
    layout: Layout
    spatial: Spatial

    @property
    def spatial_shape(self) -> torch.Size:
        """The sizes of the position dims."""
        return self.layout.spatial_shape(self.shape)

    @property
    def positions(self) -> int:
        return int(self.spatial_shape.numel())

    def channel_map(self) -> Tensor:
        return channel_map(self.m2, self.shape, self.layout)

    def full(self) -> Tensor:
        """The full spatial covariance, built from ``rho`` when only that is known."""
        cov = self.spatial.cov
        return cov if cov is not None else _equicorrelated(self.channel_map(), self.spatial.rho, self.spatial_shape)

    def mean_corr(self) -> float:
        """Average correlation between two distinct positions of one channel."""
        return mean_corr_of(self.spatial.cov, self.positions, self.spatial.rho)

    def map_mean_share(self) -> float:
        """The share of the second moment in one sample's mean over the positions of a channel,
        ``E[(mean_p x_p)²] / mean_p E[x_p²]``: the most a mean over samples too can carry, since the
        per-sample means' variance across samples is not negative."""
        n = self.positions
        cov = self.spatial.cov
        if n < 2:
            return 1.0
        if cov is None:
            return 1.0 / n + (1.0 - 1.0 / n) * self.spatial.rho
        k = cov.reshape(n, n)
        return float(k.sum() / (n * k.diagonal().sum()).clamp(min=1e-300))


@dataclass(frozen=True, eq=False)
class Signal(_Positions):
    """Forward statistics of one tensor: its second moment per element and its parts (see the module)."""

    shape: torch.Size
    m2: Tensor
    layout: Layout = CHANNELS_FIRST
    spatial: Spatial = UNCORRELATED
    shared: Shared = NO_SHARE
    dist: Dist | None = None
    const: Tensor | None = None
    activated: Activated | None = None
    blocks: Blocks | None = None
    scatter: Scatter = NO_SCATTER

    @staticmethod
    def unit(shape: torch.Size, m2: float = 1.0) -> "Signal":
        """Independent zero-mean Gaussian elements of second moment ``m2``."""
        return Signal(torch.Size(shape), uniform_map(float(m2), len(shape)))

    @staticmethod
    def constant(value: Tensor) -> "Signal":
        """A graph constant. Integer and boolean constants (an index buffer, a mask) keep their dtype, so
        that ops run on them (indexing, ``masked_fill``) do what they do on the model's tensors."""
        v = value.detach().to("cpu")
        if v.is_floating_point() or v.is_complex():
            v = v.to(DTYPE)
        shape = torch.Size(v.shape)
        return Signal(shape, v.to(DTYPE) ** 2, const=v)

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

    def with_(self, **changes: Any) -> "Signal":
        """A copy with ``changes``; the records they invalidate are dropped unless given anew."""
        return _evolve(self, changes, _SIGNAL_PARTS, ("m2",))

    def scaled(self, factor: float) -> "Signal":
        """The statistics of ``a * x`` where ``a**2 == factor``."""
        return self.with_(
            m2=self.m2 * factor,
            spatial=self.spatial.scaled(factor),
            shared=self.shared,
            activated=None if self.activated is None else self.activated.scaled(factor),
            blocks=None if self.blocks is None else self.blocks.scaled(factor),
        )


_SIGNAL_PARTS = _parts_table(("spatial", Spatial, UNCORRELATED), ("shared", Shared, NO_SHARE),
                             ("activated", Activated, None), ("blocks", Blocks, None),
                             ("scatter", Scatter, NO_SCATTER))


@dataclass(frozen=True, eq=False)
class Grad(_Positions):
    """Backward statistics: the second moment of the gradient at each element of a tensor.

    The second moment comes in three maps, by how it stands to the activation that produced this
    tensor (``total()`` is their sum):

    * ``m2``: the part that activation's backward takes through its derivative;
    * ``pre``: the part that a max pool already took through it (its argmax is where that activation
      is positive, so the two cannot be treated apart); the activation adds it without applying its
      derivative again;
    * ``dead``: the part that sits where that activation is inactive: it is measured here, but the
      activation's backward passes none of it.

    ``masked_by`` is set by a ReLU's backward: the Signal whose mask this whole gradient went
    through. A sum that feeds the ReLU and has a ReLU output among its summands (an identity
    shortcut) reads it: the two masks are correlated, and where the summand is zero its own ReLU
    passes nothing. ``spatial`` is the gradient's :class:`Spatial` statistics: a global pool sends
    every position the same gradient, and convolutions keep that correlation (a squeeze-excitation
    gate's gradient ``Σ_p g_p x_p`` is made mostly of the cross-position terms). ``scatter`` carries
    only ``logvar``.
    """

    shape: torch.Size
    m2: Tensor
    layout: Layout = CHANNELS_FIRST
    spatial: Spatial = UNCORRELATED
    pre: Tensor | None = None
    dead: Tensor | None = None
    masked_by: Signal | None = None
    scatter: Scatter = NO_SCATTER

    @staticmethod
    def unit(shape: torch.Size, m2: float = 1.0) -> "Grad":
        return Grad(torch.Size(shape), uniform_map(float(m2), len(shape)))

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
        """A copy with ``changes``; the records they invalidate are dropped unless given anew."""
        return _evolve(self, changes, _GRAD_PARTS, ("m2", "pre", "dead"))

    def scaled(self, factor: float) -> "Grad":
        return self.with_(
            m2=self.m2 * factor,
            spatial=self.spatial.scaled(factor),
            pre=None if self.pre is None else self.pre * factor,
            dead=None if self.dead is None else self.dead * factor,
        )

    def __add__(self, other: "Grad") -> "Grad":
        cov = None
        if self.spatial.cov is not None or other.spatial.cov is not None:
            cov = self.full() + other.full()
        pre = self.pre if other.pre is None else (other.pre if self.pre is None else self.pre + other.pre)
        weights = [self.mean_m2, other.mean_m2]
        logvar = combine([self.scatter.logvar, other.scatter.logvar], weights)
        dead = self.dead if other.dead is None else (other.dead if self.dead is None else self.dead + other.dead)
        # The off-diagonal second moments add as the diagonal ones do (cross terms between the two
        # are left out of both, as in m2).
        rho = _summed_rho([self, other])
        spatial = Spatial(cov, rho, _add_hidden(self.spatial.hidden, other.spatial.hidden, weights))
        return Grad(self.shape, self.m2 + other.m2, self.layout, spatial, pre=pre, dead=dead,
                    scatter=Scatter(logvar) if logvar else NO_SCATTER)


def cross_room(m: Tensor) -> float:
    """``Σ_{p≠q} √(m_p m_q)``: what a correlation ``rho`` multiplies in the cross terms of a map ``m``
    (read as everywhere: positions p and q co-vary by ``rho·√(m_p m_q)``, ``_equicorrelated``)."""
    m = m.double().clamp(min=0).reshape(-1)
    return float(m.sqrt().sum()) ** 2 - float(m.sum())


def _summed_rho(parts: list["Grad"]) -> float:
    """The correlation of a sum of independent gradients, read as everywhere (``_equicorrelated``:
    positions p and q co-vary by ``rho·√(m_p m_q)``), that keeps their cross terms: ``Σ rho_i ·
    room(m_i) / room(Σ m_i)``. For alike maps this is the mean of the rho weighted by second moment;
    for unlike ones it is not: a ViT's stream gradient is its class token's (from the head) plus every
    token's (from the blocks), and weighting by second moment divided the second's correlation by the
    class token's share, 20× too much (benchmarks/vit_attention_gaps.py)."""
    maps = [p.channel_map() for p in parts]
    room = cross_room(sum(maps))
    if room <= 0:
        total = sum(p.mean_m2 for p in parts)
        return sum(p.spatial.rho * p.mean_m2 for p in parts) / total if total > 0 else 0.0
    return sum(p.spatial.rho * cross_room(m) for p, m in zip(parts, maps)) / room


_GRAD_PARTS = _parts_table(("spatial", Spatial, UNCORRELATED), ("scatter", Scatter, NO_SCATTER))


def _add_hidden(a: Hidden | None, b: Hidden | None, weights: list[float]) -> Hidden | None:
    """The hidden spatial statistics of a sum of two gradients (kept only when both carry them)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    total = sum(weights)
    rho = (a.rho * weights[0] + b.rho * weights[1]) / total if total > 0 else 0.0
    cov = None if a.cov is None or b.cov is None else a.cov + b.cov
    return Hidden(a.shape, cov, rho)
