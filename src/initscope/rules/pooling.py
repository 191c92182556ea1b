"""Average and max pooling, sliding and adaptive, in 1, 2 and 3 dimensions.

**Average pooling** is linear: with window weights P (one matrix per axis),
``E[z_w²] = Σ_{i,j} P_wi P_wj E[x_i x_j]``, so it needs the correlation between positions. The
paper's ``(1 + (T-1)/π)/(2T)`` is this with the correlation 1/π of ReLUs of independent Gaussians;
deep in a ReLU net the correlation is much higher and the pooled second moment up to twice that.
Backward, ``E[(∂L/∂x_j)²] = Σ_{w,w'} P_wj P_w'j E[g_w g_w']``: every input in one window only when
windows do not overlap.

**Max pooling** of ``f(u)``, f monotone and u Gaussian, is ``f(max u)``. A window of T inputs with
common correlation c has ``max u = s (sqrt(c) Z + sqrt(1-c) X_T)``; the output's second moment is
``E[f(max u)²]`` (the paper's ``T ∫ s² φ Φ^(T-1)`` for ReLU and c = 0). Windows at a zero-padded
border hold fewer inputs. The gradient reaches input j from every window whose argmax it is; j is the
argmax of window w with probability 1/T_w, independently of the max's value, and of two overlapping
windows w, w' exactly when it is the argmax of their union, so
``E[(∂L/∂u_j)²] = Σ_{w,w'∋j} E[g_w g_w'] E[f'(M_{w∪w'})²] / |w ∪ w'|``. The paper's
``(1 - 2^-T)/T`` is the term w = w' for non-overlapping windows. The derivative f' of the activation
in front is taken here, at the max, because whether the argmax is active is not independent of being
the argmax (for ReLU it is active unless the whole window is negative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.geometry import Windows, prod
from initscope.rules.base import Context, Rule, bind
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.gaussian import max_conditional_mean, max_of_normals
from initscope.stats.maps import apply_axes, apply_axes_t, diagonal, sandwich, sandwich_t
from initscope.stats.signal import (CHANNELS_FIRST, Grad, Layout, Shared, Signal, Spatial, compact, mean_corr_of,
                                    mean_of, shrink)


def _tuple(value, dims: int) -> tuple:
    if value is None:
        return (None,) * dims
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(value)
    return value * dims if len(value) == 1 else value


@dataclass(frozen=True)
class PoolSpec:
    """A pooling op over the last ``len(windows)`` dims.

    ``nominal`` is the window size of the paper's model (kernel elements; for adaptive pooling the
    average window); ``divisor`` overrides the per-window divisors of average pooling.
    """

    windows: tuple[Windows, ...]
    nominal: float

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(w.out for w in self.windows)

    def weights(self) -> list[Tensor]:
        return [w.weights for w in self.windows]

    def members(self) -> list[Tensor]:
        return [w.member for w in self.windows]

    def sizes(self) -> Tensor:
        """Number of real inputs in each window, as a map over outputs."""
        t = self.windows[0].size
        for w in self.windows[1:]:
            t = t.unsqueeze(-1) * w.size
        return t

    def dense_members(self) -> Tensor:
        m = self.windows[0].member
        for w in self.windows[1:]:
            m = torch.kron(m, w.member)
        return m


def sliding_spec(in_spatial, kernel, stride, padding, dilation, ceil_mode, count_include_pad=True, divisor=None) -> PoolSpec:
    d = len(in_spatial)
    kernel = _tuple(kernel, d)
    stride = _tuple(stride if stride not in (None, ()) else kernel, d)
    padding, dilation = _tuple(padding, d), _tuple(dilation, d)
    windows = tuple(
        Windows.sliding(in_spatial[i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode, count_include_pad)
        for i in range(d)
    )
    if divisor:
        # divisor_override divides every window by one number, not a per-axis product.
        windows = tuple(w.override(1.0) for w in windows[:-1]) + (windows[-1].override(float(divisor)),)
    return PoolSpec(windows, float(prod(kernel)))


def adaptive_spec(in_spatial, output_size) -> PoolSpec:
    d = len(in_spatial)
    out = _tuple(output_size, d)
    out = tuple(in_spatial[i] if out[i] is None else int(out[i]) for i in range(d))
    windows = tuple(Windows.adaptive(in_spatial[i], out[i]) for i in range(d))
    mean_size = float(torch.stack([w.size.mean() for w in windows]).prod()) if d else 1.0
    return PoolSpec(windows, mean_size)


def _out_shape(x: Signal, spec: PoolSpec) -> torch.Size:
    d = len(spec.windows)
    return torch.Size((*x.shape[:-d], *spec.out_spatial))


def _spatial(x: Signal, d: int) -> torch.Size:
    return torch.Size(x.shape[-d:])


def _full_map(m2: Tensor, shape: torch.Size, d: int) -> Tensor:
    m = compact(m2, shape)
    return m.expand(*m.shape[:-d], *shape[-d:])


def _channel_mean(m: Tensor, d: int) -> Tensor:
    lead = tuple(range(m.ndim - d))
    return m.mean(dim=lead) if lead else m


# -- average pooling -------------------------------------------------------------------------------
def avg_forward(ctx: Context, x: Signal, spec: PoolSpec) -> Signal:
    d = len(spec.windows)
    out_shape = _out_shape(x, spec)
    m = _full_map(x.m2, x.shape, d)
    w, wsq = spec.weights(), [p**2 for p in spec.weights()]
    s = m.sqrt()
    ps = apply_axes(s, w)
    if ctx.plane:
        # The paper's model: uniform inputs, independent windows of nominal size.
        t = spec.nominal
        rho = x.spatial.rho if ctx.local else x.mean_corr()
        m2 = m.mean() * ((1 - rho) / t + rho) * torch.ones(out_shape[-d:], dtype=DTYPE)
        return Signal(out_shape, compact(m2, out_shape), spatial=Spatial(rho=rho), shared=Shared(x.shared.xcorr),
                      dist=_pooled_dist(x, mean_of(m2)))
    out_positions = prod(spec.out_spatial)
    cov, rho = None, x.spatial.rho
    if x.positions <= 16 * ctx.max_cov and (x.spatial.cov is not None or ctx.keep_cov(out_positions)):
        k_out = sandwich(x.full(), w)
        diag = diagonal(k_out, torch.Size(spec.out_spatial))
        chan = apply_axes(_channel_mean(m, d), wsq)
        m2 = diag * apply_axes(m, wsq) / chan.clamp(min=1e-300) if m.shape[:-d].numel() > 1 else diag.expand(m.shape[:-d] + diag.shape)
        if ctx.keep_cov(out_positions):
            cov = k_out
        else:
            rho = Signal(out_shape, m2, spatial=Spatial(k_out)).mean_corr() if out_positions > 1 else 0.0
    else:
        rho_in = max(x.spatial.rho, -1.0 / (x.positions - 1)) if x.positions > 1 else x.spatial.rho
        m2 = ((1 - rho_in) * apply_axes(m, wsq) + rho_in * ps**2).clamp(min=0.0)
        rho = x.spatial.rho * mean_of(ps**2) / max(mean_of(m2), 1e-300)
    xcorr = x.shared.xcorr * mean_of(ps**2) / max(mean_of(m2), 1e-300)
    return Signal(out_shape, compact(m2, out_shape), spatial=Spatial(cov, min(rho, 1.0)),
                  shared=Shared(min(xcorr, 1.0)), dist=_pooled_dist(x, mean_of(m2)))


def _pooled_dist(x: Signal, m2_out: float) -> Dist | None:
    """The mean of a window keeps the inputs' mean; its fluctuation is taken as Gaussian."""
    if x.dist is None:
        return None
    mu = x.dist.mean * math.sqrt(max(x.mean_m2, 0.0))
    var = max(m2_out - mu * mu, 0.0)
    if m2_out <= 0:
        return None
    return Dist.gaussian().scale(math.sqrt(var)).shift(mu).compress().standardized()


def avg_backward(ctx: Context, x: Signal, spec: PoolSpec, grad: Grad) -> Grad:
    d = len(spec.windows)
    g = _full_map(grad.total(), grad.shape, d)
    if ctx.plane:
        # Independent windows of nominal size: each input in one window.
        return Grad(x.shape, compact(g.mean() / spec.nominal**2 * torch.ones(x.shape[-d:], dtype=DTYPE), x.shape))
    w, wsq = spec.weights(), [p**2 for p in spec.weights()]
    m2 = apply_axes_t(g, wsq)
    cov, rho = None, 0.0
    if grad.spatial.cov is not None:
        full = sandwich_t(grad.spatial.cov, w)
        cross = diagonal(full, _spatial(x, d)) - apply_axes_t(_channel_mean(g, d), wsq)
        m2 = m2 + cross
        if ctx.keep_cov(x.positions):
            cov = full
        elif x.positions > 1:
            rho = mean_corr_of(full, x.positions, 0.0)
    elif prod(spec.out_spatial) == 1 and x.positions > 1:
        # Global pooling sends one gradient to every position: fully correlated.
        if x.positions <= ctx.max_cov:
            cov = sandwich_t(torch.diag(_channel_mean(g, d).reshape(1)).reshape(*(1,) * d, *(1,) * d), w)
        else:
            rho = 1.0
    elif grad.spatial.rho != 0.0 and x.positions > 1:
        # Overlapping windows add ρ Σ_{w≠w'∋p} a_w a_w' E[g²] to each position (nothing when they do not
        # overlap); pairs of positions in one window are a vanishing share of a large map's pairs.
        rho = grad.spatial.rho
        m2 = (1 - rho) * m2 + rho * apply_axes_t(g.sqrt(), w) ** 2
    return Grad(x.shape, compact(m2, x.shape), spatial=Spatial(cov, rho))


# -- max pooling -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MaxInput:
    """What is maxed: ``f(u)`` with u the pre-activation (Gaussian, or a known marginal)."""

    f: object  # Activation or None for the identity
    pre: Signal
    corr: float

    def fn(self, t: Tensor) -> Tensor:
        return t if self.f is None else self.f.fn(t)

    def dfn2(self, t: Tensor) -> Tensor:
        return torch.ones_like(t) if self.f is None else self.f.deriv(t) ** 2

    @property
    def homogeneous(self) -> bool:
        return self.f is None or self.f.homogeneous


def _max_input(x: Signal, plane: bool) -> _MaxInput:
    if x.activated is not None:
        pre, f = x.activated.pre, x.activated.f
    else:
        pre, f = x, None
    corr = 0.0 if plane or pre.dist is not None else max(0.0, pre.mean_corr())
    return _MaxInput(f, pre, corr)


def _max_dist(mi: _MaxInput, count: int) -> Dist:
    """Distribution of the max of ``count`` pre-activations, in units of their scale."""
    if mi.pre.dist is None:
        return max_of_normals(count, round(mi.corr, 4))
    return mi.pre.dist.maximum(count)


@lru_cache(maxsize=4096)
def _relu_active(count: int) -> float:
    """P(max of count independent standard normals > 0), exactly."""
    return 1.0 - 2.0 ** (-count)


def _active(mi: _MaxInput, count: int, scale: float) -> float:
    """``E[f'(M)²]`` at the max M of ``count`` pre-activations."""
    if mi.f is None:
        return 1.0
    if mi.f.slope is not None and mi.pre.dist is None and mi.corr == 0.0:
        p = _relu_active(count)
        return p + mi.f.slope**2 * (1 - p)
    dist = _max_dist(mi, count)
    return dist.expect(lambda t: mi.dfn2(scale * t))


def _second_moment(mi: _MaxInput, count: int, scale: float) -> float:
    """``E[f(M)²] / scale²`` for the max M of ``count`` pre-activations of second moment scale²."""
    dist = _max_dist(mi, count)
    if mi.homogeneous:
        return dist.expect(lambda t: mi.fn(t) ** 2)
    return dist.expect(lambda t: mi.fn(scale * t) ** 2) / scale**2


def max_forward(ctx: Context, x: Signal, spec: PoolSpec) -> Signal:
    d = len(spec.windows)
    out_shape = _out_shape(x, spec)
    mi = _max_input(x, ctx.plane)
    pre_m = _full_map(mi.pre.m2, mi.pre.shape, d)
    scale = math.sqrt(max(mi.pre.mean_m2, 1e-300))
    if ctx.plane:
        t = int(round(spec.nominal))
        m2 = pre_m.mean() * _second_moment(mi, t, scale) * torch.ones(out_shape[-d:], dtype=DTYPE)
        sizes = torch.full(out_shape[-d:], float(t), dtype=DTYPE)
    else:
        sizes = spec.sizes()
        # Mean pre-activation second moment over each window's real inputs.
        window_mean = apply_axes(pre_m, [w.member / w.size.clamp(min=1).unsqueeze(1) for w in spec.windows])
        factor = torch.zeros_like(sizes)
        for t in sizes.unique().tolist():
            factor[sizes == t] = _second_moment(mi, int(t), scale)
        m2 = window_mean * factor
    typical = int(sizes.flatten().mode().values)
    dist = _max_dist(mi, typical)
    image = dist.map(lambda t: mi.fn(scale * t)).standardized() if not mi.homogeneous else dist.map(mi.fn).standardized()
    # Correlation of two windows' maxima (taken as sharing no input).
    cross = _off_window_corr(mi, typical, mi.corr, scale)
    if mi.pre.dist is None:
        xcorr = _off_window_corr(mi, typical, min(max(mi.pre.shared.xcorr, 0.0), 1.0), scale)
    else:
        # Maxima of independent windows share their mean: E[M]²/E[M²], larger than the input's share
        # (a max of non-negative values is further from zero than its inputs).
        xcorr = max(cross, x.shared.xcorr)
    out_positions = prod(spec.out_spatial)
    cov = None
    if ctx.keep_cov(out_positions):
        s = _channel_mean(compact(m2, out_shape).expand(*out_shape[:-d], *out_shape[-d:]), d).reshape(-1).sqrt()
        k = cross * torch.outer(s, s)
        k.diagonal().copy_(s**2)
        cov = k.reshape(*spec.out_spatial, *spec.out_spatial)
    return Signal(out_shape, compact(m2, out_shape), spatial=Spatial(cov, cross), shared=Shared(xcorr), dist=image)


def _off_window_corr(mi: _MaxInput, count: int, corr: float, scale: float) -> float:
    if mi.pre.dist is not None:
        dist = _max_dist(mi, count)
        return dist.expect(mi.fn) ** 2 / max(dist.expect(lambda t: mi.fn(t) ** 2), 1e-300)
    fn = mi.fn if mi.homogeneous else (lambda t: mi.fn(scale * t))
    cond, wz = max_conditional_mean(count, corr, fn)
    m2 = max_of_normals(count, round(corr, 4)).expect(lambda t: fn(t) ** 2)
    return float((cond**2 * wz).sum()) / max(m2, 1e-300)


def max_backward(ctx: Context, x: Signal, spec: PoolSpec, grad: Grad) -> Grad:
    d = len(spec.windows)
    mi = _max_input(x, ctx.plane)
    scale = math.sqrt(max(mi.pre.mean_m2, 1e-300))
    g = _full_map(grad.total(), grad.shape, d)
    if ctx.plane:
        t = int(round(spec.nominal))
        m2 = g.mean() * _active(mi, t, scale) / t * torch.ones(x.shape[-d:], dtype=DTYPE)
    else:
        sizes = spec.sizes()
        per_window = torch.zeros_like(sizes)
        for t in sizes.unique().tolist():
            per_window[sizes == t] = _active(mi, int(t), scale) / t
        m2 = apply_axes_t(g * per_window, spec.members())
        if grad.spatial.cov is not None:
            m2 = m2 + _overlap_terms(mi, spec, grad.spatial.cov, sizes, scale).reshape(x.shape[-d:])
    m2 = compact(m2, x.shape)
    # Two positions in different windows both carry gradient only when each is its window's argmax (and,
    # behind a ReLU, positive): E[1_p 1_q] E[g_w g_w'] against E[1_p] E[g²], which scales the windows'
    # correlation by the share of the gradient that arrives (f' is 0 or 1 there).
    rho = 0.0
    if x.positions > 1 and grad.mean_corr() != 0.0:
        rho = grad.mean_corr() * min(mean_of(m2) / max(mean_of(g), 1e-300), 1.0)
    if mi.f is not None:
        # Already taken through the activation in front; its backward adds this as it is.
        return Grad(x.shape, torch.zeros_like(m2), spatial=Spatial(rho=rho), pre=m2)
    return Grad(x.shape, m2, spatial=Spatial(rho=rho))


def _overlap_terms(mi: _MaxInput, spec: PoolSpec, gcov: Tensor, sizes: Tensor, scale: float) -> Tensor:
    """``Σ_{w≠w'∋j} E[g_w g_w'] E[f'(M_U)²]/|U|`` for overlapping windows w, w' (U their union)."""
    member = spec.dense_members()
    n_out = member.shape[0]
    overlap = member @ member.T
    t = sizes.reshape(-1)
    union = t.unsqueeze(0) + t.unsqueeze(1) - overlap
    pair = (overlap > 0) & ~torch.eye(n_out, dtype=torch.bool)
    if not bool(pair.any()):
        return torch.zeros(member.shape[1], dtype=DTYPE)
    weight = torch.zeros_like(overlap)
    for u in union[pair].unique().tolist():
        weight[pair & (union == u)] = _active(mi, int(u), scale) / u
    w = gcov.reshape(n_out, n_out) * weight
    return ((w @ member) * member).sum(0)


# -- rules -----------------------------------------------------------------------------------------
class PoolRule(Rule):
    """Average (``kind = "avg"``) or max pooling over sliding or adaptive windows."""

    kind = "avg"

    def homogeneous(self, ctx: Context) -> bool:
        return True

    def spec(self, ctx: Context, x: Signal, *args, **kwargs) -> PoolSpec:
        raise NotImplementedError

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
        spec = self.spec(ctx, x, *args, **kwargs)
        ctx.put(spec)
        if self.kind == "avg":
            return avg_forward(ctx, x, spec)
        return max_forward(ctx, x, spec)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        spec = ctx.get(PoolSpec)
        if self.kind == "avg":
            return {x: avg_backward(ctx, x, spec, grad)}
        return {x: max_backward(ctx, x, spec, grad)}


def _dims_of(target) -> int:
    name = getattr(target, "__name__", "")
    return int(name.rstrip("d")[-1])


def _check_indices(return_indices: bool, where: str) -> None:
    if return_indices:
        raise ValueError(f"max pooling with return_indices=True at {where!r} is not supported")


@register_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
class MaxPoolModule(PoolRule):
    kind = "max"

    def spec(self, ctx, x, *args, **kwargs):
        m = ctx.module
        _check_indices(m.return_indices, ctx.where)
        d = _dims_of(type(m))
        return sliding_spec(x.shape[-d:], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@register_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
class AvgPoolModule(PoolRule):
    def spec(self, ctx, x, *args, **kwargs):
        m = ctx.module
        d = _dims_of(type(m))
        return sliding_spec(x.shape[-d:], m.kernel_size, m.stride, m.padding, 1, m.ceil_mode,
                            m.count_include_pad, getattr(m, "divisor_override", None))


@register_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
class AdaptiveAvgPoolModule(PoolRule):
    def spec(self, ctx, x, *args, **kwargs):
        d = _dims_of(type(ctx.module))
        return adaptive_spec(x.shape[-d:], ctx.module.output_size)


@register_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
class AdaptiveMaxPoolModule(PoolRule):
    kind = "max"

    def spec(self, ctx, x, *args, **kwargs):
        _check_indices(ctx.module.return_indices, ctx.where)
        d = _dims_of(type(ctx.module))
        return adaptive_spec(x.shape[-d:], ctx.module.output_size)


_MAX_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
_AVG_FUNCS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_ADAPTIVE_AVG = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_ADAPTIVE_MAX = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)


@register_rule(*_MAX_FUNCS)
class MaxPoolFunction(PoolRule):
    kind = "max"

    def spec(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
        _check_indices(p["return_indices"], ctx.where)
        d = _MAX_FUNCS.index(ctx.node.target) + 1
        return sliding_spec(x.shape[-d:], p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])


@register_rule(*_AVG_FUNCS)
class AvgPoolFunction(PoolRule):
    def spec(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                  {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
        d = _AVG_FUNCS.index(ctx.node.target) + 1
        return sliding_spec(x.shape[-d:], p["kernel_size"], p["stride"], p["padding"], 1, p["ceil_mode"],
                            p["count_include_pad"], p["divisor_override"])


@register_rule(*_ADAPTIVE_AVG)
class AdaptiveAvgPoolFunction(PoolRule):
    def spec(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("output_size",), {})
        d = _ADAPTIVE_AVG.index(ctx.node.target) + 1
        return adaptive_spec(x.shape[-d:], p["output_size"])


@register_rule(*_ADAPTIVE_MAX)
class AdaptiveMaxPoolFunction(PoolRule):
    kind = "max"

    def spec(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("output_size", "return_indices"), {"return_indices": False})
        _check_indices(p["return_indices"], ctx.where)
        d = _ADAPTIVE_MAX.index(ctx.node.target) + 1
        return adaptive_spec(x.shape[-d:], p["output_size"])


@dataclass(frozen=True)
class MeanDims:
    """What ``x.mean(dims)`` pools, and whether it keeps the pooled dims (for its backward)."""

    spec: PoolSpec
    keepdim: bool


class MeanRule(PoolRule):
    """``x.mean(dims)`` over trailing spatial dims: a global average pool."""

    def forward(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
        dims = p["dim"]
        dims = tuple(range(len(x.shape))) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
        nd = len(x.shape)
        dims = tuple(sorted(d % nd for d in dims))
        k = len(dims)
        if k == 0 or dims != tuple(range(nd - k, nd)) or dims[0] < 2 or x.layout.spatial is not None:
            # Not a global pool over an (N, C, *spatial) map: the mean over any dims (tokens, heads).
            return reduce_forward(ctx, x, dims, bool(p["keepdim"]), mean=True)
        spec = adaptive_spec(x.shape[-k:], (1,) * k)
        ctx.put(MeanDims(spec, bool(p["keepdim"])))
        out = avg_forward(ctx, x, spec)
        if p["keepdim"]:
            return out
        m2 = compact(out.m2, out.shape)
        # The pooled dims go: no covariance between positions is left, the one correlation and the
        # shared share stay as they were.
        return out.with_(shape=torch.Size(x.shape[:-k]), m2=m2.reshape(m2.shape[:-k]),
                         spatial=Spatial(rho=out.spatial.rho), shared=out.shared)

    def backward(self, ctx, grad):
        x = ctx.args[0]
        if ctx.get(Reduced) is not None:
            return {x: reduce_backward(ctx, x, grad)}
        dims = ctx.get(MeanDims)
        spec = dims.spec
        k = len(spec.windows)
        if not dims.keepdim:
            g = compact(grad.total(), grad.shape)
            grad = Grad(torch.Size((*grad.shape, *(1,) * k)), g.reshape(*g.shape, *(1,) * k),
                        spatial=Spatial(grad.spatial.cov))
        return {x: avg_backward(ctx, x, spec, grad)}


@dataclass(frozen=True)
class Reduced:
    """What a sum or mean over dims leaves its backward."""

    dims: tuple[int, ...]
    keepdim: bool
    mean: bool


def _along(x: Signal, dim: int) -> float:
    """The correlation of two elements along ``dim``: the positions' ``rho``, else the shared share."""
    nd = len(x.shape)
    positions = tuple(range(2, nd)) if x.layout.spatial is None else tuple(d % nd for d in x.layout.spatial)
    if dim in positions:
        return x.mean_corr() if x.layout.spatial is None else x.spatial.rho
    return x.shared.xcorr


def reduce_forward(ctx, x: Signal, dims: tuple[int, ...], keepdim: bool, mean: bool) -> Signal:
    r"""``x.sum(dims)`` or ``x.mean(dims)`` over any dims: ``E[(Σ_k x_k)²] = Σ_k E[x_k²] (1 + (K − 1) c)``
    per reduced dim, c the correlation along it (``rho`` for the layout's positions, the shared share
    ``xcorr`` for channels and other dims: a resnest's radix splits, a ViT's token mean); a mean
    divides by K²."""
    ctx.put(Reduced(dims, keepdim, mean))
    m = compact(x.m2, x.shape).expand(x.shape)
    factor = 1.0
    for d in dims:
        k = int(x.shape[d])
        c = min(max(_along(x, d), -1.0 / max(k - 1, 1)), 1.0)
        factor *= (1.0 + (k - 1) * c) / (k if mean else 1.0)
    m2 = m.sum(dim=dims, keepdim=keepdim) * factor
    shape = torch.Size(m2.shape)
    nd = len(x.shape)
    layout = x.layout
    rho = x.spatial.rho
    if layout.spatial is not None:
        positions = tuple(d % nd for d in layout.spatial)
        if any(d in dims for d in positions):
            layout, rho = CHANNELS_FIRST, 0.0
        elif not keepdim:
            shift = lambda d: d - sum(1 for r in dims if r < d)  # noqa: E731
            channel = layout.channel_dim(nd)
            layout = Layout(-1 if channel == nd - 1 else shift(channel), tuple(shift(d) for d in positions))
    elif not keepdim or any(d >= 2 for d in dims):
        layout, rho = CHANNELS_FIRST, 0.0
    total = float(m2.mean()) if m2.numel() else 0.0
    xcorr = min(1.0, x.shared.xcorr * x.mean_m2 * factor * (math.prod(int(x.shape[d]) for d in dims)) / total) \
        if total > 0 else 0.0
    return Signal(shape, shrink(m2), layout, Spatial(rho=rho), Shared(xcorr))


def reduce_backward(ctx, x: Signal, grad: Grad) -> Grad:
    held = ctx.get(Reduced)
    g = compact(grad.total(), grad.shape)
    if not held.keepdim:
        for d in sorted(held.dims):
            g = g.unsqueeze(d)
    scale = 1.0
    for d in held.dims:
        k = int(x.shape[d])
        scale *= 1.0 / (k * k) if held.mean else 1.0
    # Every element of a reduced slice gets the same gradient: perfectly correlated along it.
    nd = len(x.shape)
    positions = tuple(range(2, nd)) if x.layout.spatial is None else tuple(d % nd for d in x.layout.spatial)
    rho = 1.0 if any(d in held.dims for d in positions) else (grad.spatial.rho if x.layout.spatial is not None else 0.0)
    return Grad(x.shape, shrink(g * scale), x.layout, Spatial(rho=rho))


class SumRule(Rule):
    """``x.sum(dims)`` (``torch.sum``): see :func:`reduce_forward`."""

    def forward(self, ctx, x, *args, **kwargs):
        p = bind(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
        nd = len(x.shape)
        dims = p["dim"]
        dims = tuple(range(nd)) if dims is None else ((dims,) if isinstance(dims, int) else tuple(dims))
        return reduce_forward(ctx, x, tuple(sorted(d % nd for d in dims)), bool(p["keepdim"]), mean=False)

    def backward(self, ctx, grad):
        x = ctx.args[0]
        return {x: reduce_backward(ctx, x, grad)}


register_rule("sum")(SumRule)
register_rule(torch.sum)(type("TorchSumRule", (SumRule,), {}))
register_rule("mean")(MeanRule)
register_rule(torch.mean)(type("TorchMeanRule", (MeanRule,), {}))
