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

BatchNorm is modelled with batch statistics, as in training, whatever the module's mode.
"""

from __future__ import annotations


from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.rules.base import Context, Rule, bind
from initscope.rules.merge import concat_signals
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE
from initscope.stats.signal import (NO_SCATTER, Grad, Shared, Signal, Spatial, cat_maps, channel_blocks, compact,
                                    matched_cov, mean_of)


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
        return max(0.0, min(share, 1.0 - 1e-9))


def _versions(module: Any) -> tuple[int, ...] | None:
    """In-place write counters of a module's affine parameters (a functional norm's are graph constants)."""
    if module is None:
        return None
    return tuple(p._version for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None)


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
    """What a normalization's forward leaves its backward: the norm and the variance each element is divided by."""

    norm: _Norm
    var: Tensor


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
    scale = held.norm.w2 / held.var
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
    """A normalization: it divides by the scale it measures, so what comes in sets only the gradient's scale."""

    def fluctuation(self, ctx, inputs, out):
        # Each channel (group, position) is divided by its own scale: no draw-to-draw scatter is left.
        return out.with_(scatter=NO_SCATTER)

    def norm(self, ctx: Context, x: Signal, *args, **kwargs) -> _Norm:
        raise NotImplementedError

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
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


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class BatchNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("batch", x.shape, m.weight if m.affine else None, m.bias if m.affine else None, m.eps)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormModule(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        m = ctx.module
        return _Norm("instance", x.shape, m.weight if m.affine else None, m.bias if m.affine else None, m.eps)


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


@register_rule(F.batch_norm)
class BatchNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                  {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("batch", x.shape, p["weight"], p["bias"], p["eps"])


@register_rule(F.group_norm)
class GroupNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("group", x.shape, p["weight"], p["bias"], p["eps"], p["num_groups"])


@register_rule(F.instance_norm)
class InstanceNormFunction(NormRule):
    def norm(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
                  {"weight": None, "bias": None, "eps": 1e-5})
        return _Norm("instance", x.shape, p["weight"], p["bias"], p["eps"])


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
