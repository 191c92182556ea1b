"""Normalization layers: BatchNorm, LayerNorm, GroupNorm, InstanceNorm.

A normalization divides by the standard deviation it measures, so its output's second moment is
``γ² + β²`` whatever came in (asv.md); the weights before it set only the gradient's scale, which it
divides by the same standard deviation. Two refinements over that:

* The mean it subtracts is the part of the second moment that the pooled elements share: for
  BatchNorm (pooled over samples) that is ``xcorr``, the correlation between elements that share no
  weights; for InstanceNorm (pooled over one map) it is the mean spatial correlation.
* The per-position pattern inside the pooled set survives: a BatchNorm output keeps its input's
  quieter border, rescaled to mean ``γ² + β²``; a LayerNorm over channels equalizes every position.
* BatchNorm and InstanceNorm pool within a channel, so over a concatenation of blocks with
  different statistics (``Signal.blocks``: a DenseNet layer's input) each block is normalized with its
  own: its own mean share removed, its own marginal recentred, its own covariance. The output is the
  concatenation of the normalized blocks, and so are the scales the gradient is divided by.

BatchNorm (and InstanceNorm with ``track_running_stats``) in eval mode normalizes by the running
statistics it holds, not by the batch's: per channel the fixed affine map ``y = a x + b`` with
``a = γ/√(σ²_r + ε)`` and ``b = β − a μ_r`` (:class:`_Fixed`). It renormalizes nothing, so forward

    E[y²] = a² E[x²] + 2 a b E[x] + b²,      E[(∂L/∂x)²] = a² E[(∂L/∂y)²]

channel by channel, ``E[x]`` read from the marginal (``Signal.mean_fraction`` at the element's scale;
0 for a conv's Gaussian output, where the forward is exact). At PyTorch's initial ``μ_r = 0, σ²_r = 1,
γ = 1, β = 0`` it is the factor ``1/(1 + ε)``, which keeps every statistic of x (``Signal.scaled``);
correlations, shared shares and the finite-width scatter pass through rather than being reset. Loaded
running statistics (a checkpoint) are modelled channel by channel: see :func:`_fixed_one` for what is
exact and what is averaged over channels. Which statistics a norm uses follows the mode it runs in
(``Context.training``): batch statistics in training, and in every pass that chooses a plan's stds;
running ones in eval mode, where a probe of the model in eval mode measures them. A BatchNorm without
running statistics (``track_running_stats=False``) uses the batch's in both modes.
"""

from __future__ import annotations


import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.rules.base import Context, Rule, bind
from initscope.rules.merge import concat_signals
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.signal import (NO_SCATTER, Grad, Scatter, Shared, Signal, Spatial, cat_maps, channel_blocks,
                                    compact, matched_cov, mean_of)


def _param(value: Any) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, Signal):
        return value.const
    return value.detach().to("cpu", DTYPE)


class _Norm:
    """One normalization: which dims it pools and which dims its affine parameters run along."""

    def __init__(self, kind: str, shape: torch.Size, weight, bias, eps: float, groups: int = 1, normalized: int = 0):
        self.kind, self.shape, self.eps = kind, shape, float(eps)
        self.groups, self.normalized = groups, normalized
        self.w2 = self._affine(_param(weight), 1.0)
        self.b2 = self._affine(_param(bias), 0.0)

    def _affine(self, p: Tensor | None, default: float) -> Tensor:
        nd = len(self.shape)
        if p is None:
            return torch.tensor(default**2, dtype=DTYPE).reshape((1,) * nd)
        flat = p.reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            # Equal parameters (the default γ = 1, β = 0) keep every map channel-uniform: one number
            # instead of a per-channel map that would make every later op C times larger.
            return (flat[0] ** 2).reshape((1,) * nd)
        if self.kind in ("layer", "rms"):
            return (p**2).reshape((1,) * (nd - p.ndim) + tuple(p.shape))
        return (p**2).reshape(1, -1, *(1,) * (nd - 2))

    def unit_affine(self) -> "_Norm":
        """The same normalization with γ = 1 and β = 0."""
        plain = object.__new__(_Norm)
        plain.__dict__.update(self.__dict__)
        plain.w2, plain.b2 = self._affine(None, 1.0), self._affine(None, 0.0)
        return plain

    @property
    def per_channel(self) -> bool:
        """Each channel is normalized by statistics of its own (BatchNorm, InstanceNorm)."""
        return self.kind in ("batch", "instance")

    def block(self, start: int, count: int, shape: torch.Size) -> "_Norm":
        """The same normalization restricted to channels ``start .. start + count`` (of shape ``shape``)."""
        sub = object.__new__(_Norm)
        sub.__dict__.update(self.__dict__)
        sub.shape = shape
        # Per-channel affine parameters are sliced; channel-uniform ones broadcast as they are.
        sub.w2 = self.w2.narrow(1, start, count) if self.w2.ndim > 1 and self.w2.shape[1] > 1 else self.w2
        sub.b2 = self.b2.narrow(1, start, count) if self.b2.ndim > 1 and self.b2.shape[1] > 1 else self.b2
        return sub

    def pooled_mean(self, m: Tensor) -> Tensor:
        """Mean of an elementwise map over what one normalization statistic pools (batch excluded)."""
        # A broadcast (size-1) dim averages the same as its expansion, so ``m`` stays compact.
        nd = len(self.shape)
        m = compact(m, self.shape)
        if m.numel() == 1:  # uniform (the paper's model): every pooled mean is the value itself
            return m
        spatial = tuple(range(2, nd))
        if self.kind in ("batch", "instance"):
            return m.mean(dim=spatial, keepdim=True) if spatial else m
        if self.kind in ("layer", "rms"):
            return m.mean(dim=tuple(range(nd - self.normalized, nd)), keepdim=True)
        if m.shape[1] == 1:  # channel-uniform: a group's mean is the spatial mean
            return m.mean(dim=spatial, keepdim=True) if spatial else m
        full = m.expand(self.shape)
        c = self.shape[1]
        g = full.reshape(1, self.groups, c // self.groups, *self.shape[2:])
        pooled = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
        return pooled.expand_as(g).reshape(self.shape)

    def removed(self, x: Signal) -> float:
        """Fraction of the second moment the subtracted mean carries."""
        if self.kind == "rms":
            return 0.0  # RMSNorm divides by the root mean square and subtracts nothing
        if self.kind == "layer" and x.layout.spatial is not None:
            # A LayerNorm over a token's channels subtracts the token's mean over channels. What the
            # channels share there is the marginal's mean (after an activation), not the offsets a
            # Linear gives each channel across samples (``xcorr``): those average out over channels.
            return max(0.0, min(x.mean_fraction**2, 1.0 - 1e-9))
        if self.kind == "instance":
            return max(0.0, x.mean_corr()) if x.positions > 1 else 1.0
        share = x.shared.batch_mean if self.kind == "batch" else x.shared.xcorr
        if self.kind == "batch":
            # The mean share is computed per op and the spatial correlation per position (a ReLU
            # takes the first without the border's correction): on a small map the share could pass
            # what a channel's mean can hold, and the map's mean after the norm would come out negative.
            share = min(share, x.map_mean_share())
        return max(0.0, min(share, 1.0 - 1e-9))


def _versions(module: Any, names: tuple[str, ...] = ("weight", "bias")) -> tuple[int, ...] | None:
    """In-place write counters of a module's affine parameters (and, with ``names``, of its running
    statistics); a functional norm's are graph constants."""
    if module is None:
        return None
    return tuple(t._version for t in (getattr(module, n, None) for n in names) if t is not None)


# -- eval mode: the running statistics ---------------------------------------------------------------
@dataclass(frozen=True)
class RunningStats:
    """What a normalization in eval mode divides by: its running mean and variance, eps, and affine."""

    mean: Any
    var: Any
    eps: float
    weight: Any = None
    bias: Any = None


@dataclass(frozen=True)
class _Fixed:
    """A normalization by statistics it does not measure: per channel ``y = a x + b``.

    ``a`` and ``b`` are ``(1, C, 1, ...)`` maps, or one-element ones when every channel has the same
    (PyTorch's initial running statistics and affine keep every map channel-uniform).
    """

    a: Tensor
    b: Tensor

    @staticmethod
    def of(stats: RunningStats, shape: torch.Size, unit_affine: bool = False) -> "_Fixed":
        """``a = γ/√(σ²_r + ε)``, ``b = β − a μ_r``; ``unit_affine``: γ = 1, β = 0 (a residual knob,
        planned as applying the plan leaves it: its weight is the branch's scale, its bias zeroed)."""
        nd = len(shape)

        def per_channel(value: Any, default: float) -> Tensor:
            t = _param(value)
            if t is None:
                return torch.tensor(default, dtype=DTYPE).reshape((1,) * nd)
            flat = t.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                return flat[0].reshape((1,) * nd)
            return flat.reshape(1, -1, *(1,) * (nd - 2))

        mean, var = per_channel(stats.mean, 0.0), per_channel(stats.var, 1.0)
        gamma = per_channel(None if unit_affine else stats.weight, 1.0)
        beta = per_channel(None if unit_affine else stats.bias, 0.0)
        a = gamma / torch.sqrt(var + float(stats.eps))
        return _Fixed(a, beta - a * mean)

    def block(self, start: int, count: int) -> "_Fixed":
        """The same map restricted to channels ``start .. start + count``."""
        def cut(t: Tensor) -> Tensor:
            return t.narrow(1, start, count) if t.ndim > 1 and t.shape[1] > 1 else t
        return _Fixed(cut(self.a), cut(self.b))


def _pooled_law(base: Dist | None, scales: Tensor, shifts: Tensor) -> Dist:
    """The standardized law of ``s Z + t`` over the (s, t) pairs of every element, equally likely;
    Z ~ ``base`` (a Gaussian when None).

    Pooled over channels and positions, this is what an activation after the map reads exactly on
    average: with per-element scales ``m2`` (``E[y²]`` per element) a ReLU passes
    ``mean(m2) · E[relu(Z)²]`` = the mean of ``E[relu(y)²]`` over elements, and ``P(Z > 0)`` is the
    mean of ``P(y > 0)``. Pairs equal to 4 significant digits are one component, weighted by their
    count: a map has few distinct positions (border and interior) and a norm few distinct channels.
    """
    s, t = scales.reshape(-1), shifts.reshape(-1)
    # Rounded relative to the scale: the law's shape depends on t/s and the sign of s.
    size = s.abs().clamp(min=1e-300)
    keys = torch.stack([torch.round(torch.log(size) * 1e4), torch.round(t / size * 1e4), torch.sign(s)], 1)
    keys, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    # One representative pair per key (the first element with it).
    first = torch.full((len(keys),), len(s), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(s)), reduce="amin")
    s, t, counts = s[first], t[first], counts.to(DTYPE)
    if base is None:
        # Each component N(t, s²) in its two halves: sign masses and a ReLU's moments exact.
        return Dist.gaussians(t, s, counts).standardized()
    coarse = base.compress(max(16, min(256, 65536 // len(keys))))
    parts = [coarse.scale(float(sc)).shift(float(sh)) for sc, sh in zip(s.tolist(), t.tolist())]
    return Dist.mixture(parts, counts.tolist()).standardized()


def _fixed_one(x: Signal, fixed: _Fixed) -> tuple[Signal, Tensor, float]:
    """The Signal of ``y = a x + b`` (per channel), the factor ``a²`` its gradient is multiplied by,
    and the share of ``E[y²]`` that comes from x (what carries the weight draws' scatter).

    Exact: one positive factor and no shift (PyTorch's initial state) keeps every statistic of x,
    scaled; per-channel factors without a shift scale each channel's map and keep each element's law
    (a Gaussian stays one). The second-moment map is exact channel by channel given ``E[x]`` (0 after
    a conv; the marginal's mean at the element's scale after an activation). The channel-averaged
    covariance, ``rho``, ``xcorr`` and ``pooled`` take each channel's part in proportion to its share
    of ``E[x²]``.

    Approximate: a shift makes each channel's (and each position's) law another shape, and a Signal
    has one marginal. It becomes the pooled law of all elements (:func:`_pooled_law`), so an
    activation after it passes the mean of ``E[relu(y)²]`` and of ``P(y > 0)`` over elements exactly,
    but each channel with the average: its correlation with the channel's factor ``a_c²`` (which the
    gradient meets on the way back) is lost, and a map's border, quieter under the same shift, is
    averaged with its interior. Measured (docs/theory.md, "Normalization in eval mode"): 0.03-0.18
    bits per norm on the input gradient for random checkpoint-like statistics, under 0.07 forward.
    """
    a, b = fixed.a, fixed.b
    a2 = a * a
    shiftless = bool((b == 0).all())
    if shiftless and a.numel() == 1 and float(a) >= 0:
        # One positive factor: every statistic of x is kept, scaled (Signal.scaled is exact for it).
        return x.scaled(float(a2)), a2, 1.0
    nd = len(x.shape)
    m = compact(x.m2, x.shape)
    mf = x.mean_fraction
    spatial_dims = tuple(range(2, nd))
    # Per channel: its mean second moment over positions, relative to the whole tensor's.
    mc = m.mean(dim=spatial_dims, keepdim=True) if spatial_dims else m
    total = max(x.mean_m2, 1e-300)
    rel = mc / total
    m2 = a2 * m + b * b if mf == 0.0 else a2 * m + 2 * a * b * mf * m.sqrt() + b * b
    out_mean = max(mean_of(m2), 1e-300)
    # Channel averages of the three parts of E[y_p y_q] = a² E[x_p x_q] + a b (E x_p + E x_q) + b²,
    # each channel's x-part in proportion to its share of E[x²].
    a2w = mean_of(a2 * rel)
    abw = mean_of(a * b * rel.sqrt())
    b2w = mean_of(b * b)
    root = math.sqrt(total)

    def share(c: float) -> float:
        """A correlation of x (a share of its second moment) carried to y."""
        return (a2w * c * total + 2 * abw * mf * root + b2w) / out_mean

    cov = None
    if x.spatial.cov is not None:
        d = x.positions
        k = x.spatial.cov.reshape(d, d)
        s = k.diagonal().clamp(min=0).sqrt()
        k = a2w * k + abw * mf * (s.unsqueeze(0) + s.unsqueeze(1)) + b2w
        cov = matched_cov(k.reshape(x.spatial.cov.shape), m2, x.shape, x.layout)
    pooled = None if x.shared.pooled is None else min(max(share(x.shared.pooled), 0.0), 1.0)
    shared = Shared(min(max(share(x.shared.xcorr), 0.0), 1.0), pooled)
    if shiftless and (x.dist is None or bool((a >= 0).all())):
        # Scaled channel by channel, each element keeps its law's shape at its own scale (a Gaussian
        # stays one whatever the sign).
        dist = x.dist
    elif shiftless and bool((a <= 0).all()):
        dist = x.dist.scale(-1.0)
    else:
        # A shift (or factors of both signs on a skewed marginal) gives each channel a law of another
        # shape: the marginal is their pooled law, as a concatenation's is.
        scales = a * m.sqrt()
        scales, shifts = torch.broadcast_tensors(scales, b)
        dist = _pooled_law(x.dist, scales, shifts)
    out = Signal(x.shape, m2, x.layout, Spatial(cov, max(min(share(x.spatial.rho), 1.0), -1.0)), shared, dist=dist)
    # Without a shift all of E[y²] comes from x (exactly, not to rounding: it decides ``fresh``).
    kept = 1.0 if shiftless else min(a2w * total / out_mean, 1.0)
    return out, a2, kept


def _forward_one(ctx: Context, x: Signal, norm: _Norm) -> tuple[Signal, Tensor]:
    """The normalized Signal of ``x`` and the variance each element is divided by."""
    m = compact(x.m2, x.shape)
    r = norm.removed(x)
    if ctx.local and ctx.plane:
        m = torch.full((1,) * m.ndim, mean_of(m), dtype=DTYPE)
    var = norm.pooled_mean(m) * (1 - r) + norm.eps
    m2 = norm.w2 * m * (1 - r) / var + norm.b2
    w2, b2, v = mean_of(norm.w2), mean_of(norm.b2), mean_of(var)
    out_mean = max(mean_of(m2), 1e-300)
    cov = None
    if x.spatial.cov is not None:
        d = x.positions
        s = x.channel_map().reshape(d).sqrt()
        cov = (w2 * (x.spatial.cov.reshape(d, d) - r * torch.outer(s, s)) / v + b2).reshape(x.spatial.cov.shape)
    rho = (w2 * (x.spatial.rho - r) * x.mean_m2 / v + b2) / out_mean
    dist = None
    if x.dist is not None:
        dist = x.dist.shift(-x.dist.mean).standardized()
    out = Signal(x.shape, m2, x.layout, Spatial(cov, max(min(rho, 1.0), -1.0)), Shared(min(b2 / out_mean, 1.0)),
                 dist=dist)
    return out, var


@dataclass(frozen=True)
class NormScales:
    """What a normalization's forward leaves its backward: the norm and the variance each element is
    divided by; for one by fixed statistics, ``fixed`` (the factor ``a²`` on the gradient) and
    ``kept`` (the share of the output's second moment that comes from its input)."""

    norm: _Norm | None
    var: Tensor | None
    fixed: Tensor | None = None
    kept: float = 1.0


def _fixed_forward(ctx: Context, x: Signal, fixed: _Fixed) -> Signal:
    if x.blocks is None:
        out, a2, kept = _fixed_one(x, fixed)
        ctx.put(NormScales(None, None, a2, kept))
        return out
    # A concatenation's blocks each through their own channels' map: a ReLU after reads each block.
    outs, factors, kepts, weights = [], [], [], []
    for start, count, part in channel_blocks(x):
        out, a2, kept = _fixed_one(part, fixed.block(start, count))
        outs.append(out)
        factors.append(a2)
        kepts.append(kept)
        weights.append(count * out.mean_m2)
    ctx.put(NormScales(None, None, cat_maps(factors, [p.shape for p in x.blocks.parts], 1),
                       sum(k * w for k, w in zip(kepts, weights)) / max(sum(weights), 1e-300)))
    return concat_signals(outs, 1)


def _forward(ctx: Context, x: Signal, norm: _Norm) -> Signal:
    if x.blocks is None or not norm.per_channel:
        out, var = _forward_one(ctx, x, norm)
        ctx.put(NormScales(norm, var))
        return out
    outs, variances = [], []
    for start, count, part in channel_blocks(x):
        out, var = _forward_one(ctx, part, norm.block(start, count, part.shape))
        outs.append(out)
        variances.append(var)
    var = cat_maps(variances, [p.shape for p in x.blocks.parts], 1)
    ctx.put(NormScales(norm, var))
    return concat_signals(outs, 1)


def _backward(ctx: Context, x: Signal, grad: Grad) -> Grad:
    held = ctx.get(NormScales)
    scale = held.fixed if held.fixed is not None else held.norm.w2 / held.var
    m2 = grad.total() * scale
    cov = None
    if grad.spatial.cov is not None:
        # A scale that differs between channels (blocks of a concatenation, per-channel γ) scales the
        # channel-averaged map by the average of the products: match the covariance to the map.
        if scale.numel() == 1:
            cov = grad.spatial.cov * mean_of(scale)
        else:
            cov = matched_cov(grad.spatial.cov, m2, x.shape, x.layout)
    return Grad(x.shape, m2, x.layout, Spatial(cov, grad.mean_corr() if cov is None else 0.0))


class NormRule(Rule):
    """A normalization: it divides by the scale it measures, so what comes in sets only the gradient's scale.

    In eval mode a norm that keeps running statistics (:meth:`running`) divides by those instead:
    a fixed affine map per channel, which scales the second moment and the gradient by ``a²`` and
    keeps what the input carries (see the module docstring).
    """

    def fluctuation(self, ctx, inputs, out):
        held = ctx.get(NormScales)
        if held is not None and held.fixed is not None:
            # Fixed statistics divide every draw by the same: the draws' scatter goes on, diluted by
            # the share the fixed shift adds. Right after a weight layer and unshifted, the layer's
            # channel offsets still decide what an activation after it scatters (``fresh`` kept).
            x = inputs[0] if inputs else None
            if x is None:
                return out
            if held.kept >= 1.0:
                return super().fluctuation(ctx, inputs, out)
            return out.with_(scatter=Scatter(x.scatter.logvar * held.kept**2))
        # Each channel (group, position) is divided by its own scale: no draw-to-draw scatter is left.
        return out.with_(scatter=NO_SCATTER)

    def norm(self, ctx: Context, x: Signal, *args, **kwargs) -> _Norm:
        raise NotImplementedError

    def running(self, ctx: Context, x: Signal, *args, **kwargs) -> RunningStats | None:
        """The running statistics this norm divides by when not training; None when it has none (it
        then measures its own in every mode)."""
        return None

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
        if not ctx.training:
            stats = self.running(ctx, x, *args, **kwargs)
            if stats is not None:
                # Kept across passes while the parameters and running statistics are unchanged.
                key = (tuple(x.shape), _versions(ctx.module, _RUNNING), ctx.knob)
                fixed = ctx.remember(_Fixed, key, lambda: _Fixed.of(stats, x.shape, unit_affine=ctx.knob))
                return _fixed_forward(ctx, x, fixed)
        # Built once per traced node and kept while its parameters are unchanged: a plan runs two or
        # more passes, and reading the affine parameters costs more than the rule's arithmetic.
        key = (tuple(x.shape), _versions(ctx.module))
        norm = ctx.remember(_Norm, key, lambda: self.norm(ctx, x, *args, **kwargs))
        if ctx.knob:
            # A residual branch's knob: applying the plan writes its weight (the branch's scale) and
            # zeroes its bias, so it is planned as it will be, whatever it holds now.
            norm = norm.unit_affine()
        return _forward(ctx, x, norm)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        return {x: _backward(ctx, x, grad)}


_RUNNING = ("weight", "bias", "running_mean", "running_var")


def _module_running(m: nn.Module) -> RunningStats | None:
    """A norm module's running statistics, when it has them (``track_running_stats=True``)."""
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        return None
    return RunningStats(m.running_mean, m.running_var, m.eps, m.weight if m.affine else None,
                        m.bias if m.affine else None)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class BatchNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("batch", x.shape, m.weight if m.affine else None, m.bias if m.affine else None, m.eps)

    def running(self, ctx, x, *args, **kwargs):
        # nn.BatchNorm uses its batch's statistics in eval mode too when it keeps no running ones.
        return _module_running(ctx.module)

    def follows_mode(self, node, module) -> bool:
        return module is not None and _module_running(module) is not None


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("instance", x.shape, m.weight if m.affine else None, m.bias if m.affine else None, m.eps)

    def running(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _module_running(m) if m.track_running_stats else None

    def follows_mode(self, node, module) -> bool:
        return module is not None and bool(module.track_running_stats) and _module_running(module) is not None


@register_rule(nn.GroupNorm)
class GroupNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("group", x.shape, m.weight if m.affine else None, m.bias if m.affine else None, m.eps, m.num_groups)


@register_rule(nn.LayerNorm)
class LayerNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("layer", x.shape, m.weight, m.bias, m.eps, normalized=len(m.normalized_shape))


@register_rule(F.layer_norm)
class LayerNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
        shape = p["normalized_shape"]
        n = 1 if isinstance(shape, int) else len(shape)
        return _Norm("layer", x.shape, p["weight"], p["bias"], p["eps"], normalized=n)


_BATCH_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_INSTANCE_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")


def _node_has_running(node, names: tuple[str, ...]) -> bool:
    """Whether a functional norm's node is handed running statistics (its first two optional args)."""
    bound = bind(tuple(node.args[1:]), dict(node.kwargs), names, {"running_mean": None, "running_var": None})
    return bound["running_mean"] is not None and bound["running_var"] is not None


@register_rule(F.batch_norm)
class BatchNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, _BATCH_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("batch", x.shape, p["weight"], p["bias"], p["eps"])

    def running(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, _BATCH_NORM_ARGS,
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None, "training": False,
                   "eps": 1e-5})
        # The trace runs in eval mode, so a ``training=self.training`` argument reads False: the mode
        # is the module's (Context.training); a literal ``training=True`` still means batch statistics.
        if p["training"] is True or p["running_mean"] is None or p["running_var"] is None:
            return None
        return RunningStats(p["running_mean"], p["running_var"], p["eps"], p["weight"], p["bias"])

    def follows_mode(self, node, module) -> bool:
        return _node_has_running(node, _BATCH_NORM_ARGS)


@register_rule(F.group_norm)
class GroupNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("group", x.shape, p["weight"], p["bias"], p["eps"], p["num_groups"])


@register_rule(F.instance_norm)
class InstanceNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, _INSTANCE_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("instance", x.shape, p["weight"], p["bias"], p["eps"])

    def running(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, _INSTANCE_NORM_ARGS,
                  {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                   "use_input_stats": True, "eps": 1e-5})
        # nn.InstanceNorm passes ``use_input_stats=self.training or not self.track_running_stats``,
        # which the eval-mode trace reads as False for a module that tracks: the mode is the module's.
        if p["use_input_stats"] is True or p["running_mean"] is None or p["running_var"] is None:
            return None
        return RunningStats(p["running_mean"], p["running_var"], p["eps"], p["weight"], p["bias"])

    def follows_mode(self, node, module) -> bool:
        return _node_has_running(node, _INSTANCE_NORM_ARGS)


def _rms_eps(eps) -> float:
    return float(torch.finfo(torch.float32).eps) if eps is None else float(eps)


@register_rule(nn.RMSNorm)
class RMSNormModule(NormRule):
    """``nn.RMSNorm``: ``x / rms(x) · γ`` over the last dims; what comes in sets only the gradient's scale."""

    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("rms", x.shape, m.weight, None, _rms_eps(m.eps), normalized=len(m.normalized_shape))


@register_rule(F.rms_norm)
class RMSNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
        shape = p["normalized_shape"]
        n = 1 if isinstance(shape, int) else len(shape)
        return _Norm("rms", x.shape, p["weight"], None, _rms_eps(p["eps"]), normalized=n)
