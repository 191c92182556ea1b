"""Elementwise activations: ReLU and its family, GELU, SiLU, hard-swish, sigmoid, tanh, and any other.

For an input element of scale s and standardized marginal Z (Gaussian unless the Signal says
otherwise), the output's second moment is ``E[f(sZ)²]`` and the gradient passes with ``E[f'(sZ)²]``
(the gradient-independence assumption). For the ReLU family, ``f(x) = x`` above zero and ``a x``
below, these are scale-free: ``(1 + a²)/2`` each on a Gaussian. Any other f is integrated on a table
of scales and interpolated per element.

Correlations between positions (and with other samples) pass through the *dual* activation: with
Gaussian inputs of correlation ρ, ``E[relu(x) relu(y)]`` is the arc-cosine kernel. Inputs that are
not zero-mean Gaussians (a ReLU after a residual add) are approximated, for correlations only, by a
Gaussian with the marginal's mean and variance; the output correlation is then exact at ρ = 0 and
ρ = 1 and interpolated between by that model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.rules.base import Context, Rule
from initscope.rules.merge import concat_signals
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE, Dist, normal_grid
from initscope.stats.elementwise import Activation, known_activation
from initscope.stats.gaussian import dual_from_coefficients, hermite_coefficients, normal_cdf
from initscope.stats.fluctuation import channel_scatter
from initscope.stats.maps import correlation
from initscope.stats.signal import (Activated, Grad, Scatter, Shared, Signal, Spatial, cat_maps, channel_map, compact,
                                    matched_cov, mean_of)

_SCALES = torch.logspace(-6, 6, 481, dtype=DTYPE)
_R = torch.linspace(-1.0, 1.0, 401, dtype=DTYPE)


# -- marginal statistics -------------------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    """``E[f]``, ``E[f²]``, ``E[f']``, ``E[f'²]`` for a unit-scale input."""

    mean: float
    m2: float
    dmean: float
    dm2: float


def _moments(act: Activation, base: Dist, scale: float = 1.0) -> Moments:
    x = base.x * scale
    y, d = act.fn(x), act.deriv(x)
    w = base.w
    return Moments(float((y * w).sum()), float((y * y * w).sum()), float((d * w).sum()), float((d * d * w).sum()))


def gaussian_moments(act: Activation) -> Moments:
    if act.slope is not None:
        a = act.slope
        return Moments((1 - a) / math.sqrt(2 * math.pi), (1 + a * a) / 2, (1 + a) / 2, (1 + a * a) / 2)
    return _moments(act, Dist.gaussian())


@lru_cache(maxsize=256)
def _table(act: Activation) -> tuple[Tensor, Tensor, Tensor]:
    """``E[f(sZ)²]/s²``, ``E[f'(sZ)²]`` and ``E[f(sZ)]/s`` on a log grid of scales s, Z ~ N(0, 1)."""
    z, w = normal_grid()
    x = _SCALES.unsqueeze(1) * z.unsqueeze(0)
    y, d = act.fn(x), act.deriv(x)
    s = _SCALES
    return (y * y * w).sum(1) / s**2, (d * d * w).sum(1), (y * w).sum(1) / s


def _interp(table: Tensor, scale: Tensor) -> Tensor:
    logs = torch.log(_SCALES)
    pos = (torch.log(scale.clamp(float(_SCALES[0]), float(_SCALES[-1]))) - logs[0]) / (logs[1] - logs[0])
    lo = pos.floor().long().clamp(0, len(table) - 2)
    frac = pos - lo
    return table[lo] * (1 - frac) + table[lo + 1] * frac


# -- dual activations (correlations) ---------------------------------------------------------------
def _relu_family_duals(slope: float, mean: float) -> tuple[Tensor, Tensor]:
    """``E[f(X)f(Y)]`` and ``E[f'(X)f'(Y)]`` on the ρ grid for X, Y ~ N(mean, 1) with correlation ρ."""
    z, w = normal_grid(n=4000)
    r = _R.unsqueeze(1)
    c = mean + r * z.unsqueeze(0)
    s = torch.sqrt((1 - r**2).clamp(min=1e-24))
    pdf = torch.exp(-0.5 * (c / s) ** 2) / math.sqrt(2 * math.pi)
    cdf = normal_cdf(c / s)
    # E[relu(N(c, s²))] = c Φ(c/s) + s φ(c/s); f = relu(y) - a relu(-y), f' = 1(y>0) + a 1(y<0).
    inner_f = (c * cdf + s * pdf) - slope * (-c * (1 - cdf) + s * pdf)
    inner_d = cdf + slope * (1 - cdf)
    x = mean + z.unsqueeze(0)
    fx = torch.where(x > 0, x, slope * x)
    dx = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))
    return (fx * inner_f * w).sum(1), (dx * inner_d * w).sum(1)


def _hermite_duals(act: Activation, mean: float, scale: float) -> tuple[Tensor, Tensor]:
    z, _ = normal_grid()
    x = scale * (mean + z)
    return (
        dual_from_coefficients(hermite_coefficients(act.fn(x)), _R),
        dual_from_coefficients(hermite_coefficients(act.deriv(x)), _R),
    )


@lru_cache(maxsize=1024)
def _centered_duals(act: Activation, mean: float, scale: float) -> tuple[Tensor, Tensor]:
    """Output correlation (centered) as a function of input correlation (centered), forward and backward."""
    if act.slope is not None:
        ff, dd = _relu_family_duals(act.slope, mean)
    else:
        ff, dd = _hermite_duals(act, mean, scale)
    f0, f1 = ff[len(_R) // 2], ff[-1]
    d0, d1 = dd[len(_R) // 2], dd[-1]
    # At ρ = 0 the two are independent (E[f]²), at ρ = 1 identical (E[f²]).
    cf = (ff - f0) / (f1 - f0) if float(f1 - f0) > 1e-300 else torch.zeros_like(ff)
    cd = (dd - d0) / (d1 - d0) if float(d1 - d0) > 1e-300 else torch.zeros_like(dd)
    return cf, cd


def _key(value: float) -> float:
    """A cache key for a float: four significant digits."""
    return float(f"{value:.4g}")


def _on_grid(curve: Tensor, r: Tensor | float) -> Tensor | float:
    """Linear interpolation of ``curve`` (given on the ρ grid ``_R``) at ``r``: a tensor, or one float."""
    n = len(_R)
    if isinstance(r, float):
        # One correlation (rho, xcorr): plain Python, far cheaper than a dozen small tensor ops.
        pos = (min(max(r, -1.0), 1.0) + 1.0) / 2.0 * (n - 1)
        lo = min(max(int(math.floor(pos)), 0), n - 2)
        frac = pos - lo
        values = _curve_values(curve)
        return values[lo] * (1 - frac) + values[lo + 1] * frac
    pos = (r.clamp(-1.0, 1.0) + 1.0) * ((n - 1) / 2.0)
    lo = pos.floor().clamp_(0, n - 2)
    frac = pos - lo
    # index_select on the flat index: a third of the cost of advanced indexing on a covariance.
    lo = lo.long().reshape(-1)
    return torch.lerp(curve.index_select(0, lo), curve.index_select(0, lo + 1), frac.reshape(-1)).reshape(r.shape)


_CURVE_VALUES: dict[int, tuple[Tensor, list[float]]] = {}


def _curve_values(curve: Tensor) -> list[float]:
    """``curve`` as a Python list, kept per tensor (the curves are cached and never change)."""
    hit = _CURVE_VALUES.get(id(curve))
    if hit is None or hit[0] is not curve:
        hit = (curve, curve.tolist())
        _CURVE_VALUES[id(curve)] = hit
    return hit[1]


@lru_cache(maxsize=1024)
def _scatter(act: Activation, xi: float, scale: float) -> tuple[float, float]:
    return channel_scatter(act.fn, act.deriv, xi, scale)


# -- the rule ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Applied:
    """What applying f to a given input yields, per element and as marginal constants."""

    m2: Tensor  # E[f(x)²] per element
    dm2: Tensor  # E[f'(x)²] per element
    out: Moments  # unit-scale moments at the mean scale (for correlations and the output marginal)
    inp_mean: float  # standardized mean of the input
    dist: Dist | None


@lru_cache(maxsize=256)
def _gaussian_image(act: Activation) -> Dist | None:
    """The standardized marginal of f(Z), Z ~ N(0, 1); None when that is again a zero-mean Gaussian."""
    if act.slope == 1.0:
        return None
    return Dist.gaussian().map(act.fn).standardized()


def apply_activation(act: Activation, x: Signal) -> _Applied:
    m2 = compact(x.m2, x.shape)
    if x.dist is None and act.homogeneous:
        g = gaussian_moments(act)
        return _Applied(g.m2 * m2, torch.full_like(m2, g.dm2), g, 0.0, _gaussian_image(act))
    base = x.dist if x.dist is not None else Dist.gaussian()
    if act.homogeneous:
        mom = _moments(act, base)
        return _Applied(mom.m2 * m2, torch.full_like(m2, mom.dm2), mom, base.mean, base.map(act.fn).standardized())
    scale = math.sqrt(max(x.mean_m2, 1e-300))
    if x.dist is None:
        t2, td, _ = _table(act)
        s = m2.clamp(min=1e-300).sqrt()
        per_m2, per_dm2 = _interp(t2, s) * m2, _interp(td, s)
    else:
        # A non-Gaussian marginal: integrate at the mean scale, apply per element by the scale ratio.
        mom_s = _moments(act, base, scale)
        per_m2 = mom_s.m2 * m2 / scale**2
        per_dm2 = torch.full_like(m2, mom_s.dm2)
    mom = _moments(act, base, scale)
    unit = Moments(mom.mean / scale, mom.m2 / scale**2, mom.dmean, mom.dm2)
    return _Applied(per_m2, per_dm2, unit, base.mean, base.map(lambda t: act.fn(scale * t)).standardized())


def _map_corr(act: Activation, applied: _Applied, rho: Tensor | float, inp_m2: float, scale: float) -> Tensor | float:
    """Non-centered output correlation for non-centered input correlation ``rho`` (same-scale pair)."""
    mu = applied.inp_mean
    var = max(1.0 - mu * mu, 1e-12)
    r = (rho - mu * mu) / var
    o = applied.out
    out_var = max(o.m2 - o.mean**2, 0.0)
    if act.slope is not None and mu == 0.0 and act.homogeneous:
        cf, _ = _centered_duals(act, 0.0, 1.0)
    else:
        cf, _ = _centered_duals(act, _key(mu / math.sqrt(var)), _key(scale * math.sqrt(var)))
    if o.m2 <= 0:
        return 0.0 if isinstance(rho, float) else torch.zeros_like(rho)
    return (o.mean**2 + out_var * _on_grid(cf, r)) / o.m2


def _map_mask(act: Activation, applied: _Applied, rho: Tensor | float, scale: float) -> Tensor | float:
    """``E[f'(x)f'(y)] / E[f'²]`` as a function of the inputs' non-centered correlation."""
    mu = applied.inp_mean
    var = max(1.0 - mu * mu, 1e-12)
    r = (rho - mu * mu) / var
    o = applied.out
    key = (0.0, 1.0) if (act.slope is not None and mu == 0.0) else (_key(mu / math.sqrt(var)), _key(scale * math.sqrt(var)))
    _, cd = _centered_duals(act, *key)
    dvar = max(o.dm2 - o.dmean**2, 0.0)
    if o.dm2 <= 0:
        return 0.0 if isinstance(rho, float) else torch.zeros_like(rho)
    return (o.dmean**2 + dvar * _on_grid(cd, r)) / o.dm2


def _map_signal(act: Activation, x: Signal) -> tuple[Signal, _Applied | None]:
    """The Signal of ``f(x)``, and what applying f gave (None where f is the identity on x)."""
    if act.slope is not None and x.nonneg:
        # f is the identity on non-negative inputs (a ReLU after a max pool of ReLUs, or after an
        # identity residual block); it is still f of x, whose mask a sum's gradient reads.
        return x.with_(activated=Activated(act, x)), None
    applied = apply_activation(act, x)
    scale = math.sqrt(max(x.mean_m2, 1e-300))
    cov, rho = None, x.spatial.rho
    if x.spatial.cov is not None:
        d = x.positions
        corr = correlation(x.spatial.cov, d)
        out_corr = _map_corr(act, applied, corr, x.mean_m2, scale)
        s = channel_map(applied.m2, x.shape, x.layout).reshape(d).clamp(min=0).sqrt()
        cov = (out_corr * torch.outer(s, s)).reshape(x.spatial.cov.shape)
    elif x.positions > 1:
        rho = float(_map_corr(act, applied, float(x.spatial.rho), x.mean_m2, scale))
    xcorr = float(_map_corr(act, applied, float(x.shared.xcorr), x.mean_m2, scale))
    out = Signal(x.shape, applied.m2, x.layout, Spatial(cov, rho), Shared(xcorr), dist=applied.dist,
                 activated=Activated(act, x) if act.monotone else None)
    return out, applied


@dataclass(frozen=True)
class Applied:
    """What an activation node applied in this pass: f, and its per-element results (its backward
    reads the derivative map; the residual policy reads whether f is positively homogeneous)."""

    act: Activation
    applied: _Applied | None  # None: f was the identity on x's values (non-negative inputs)


@dataclass(frozen=True)
class _GradScatter:
    """The draw-to-draw scatter an activation right after a weight layer adds to the gradient."""

    logvar: float


class ElementwiseRule(Rule):
    """Any elementwise activation; subclasses say which function a node applies."""

    def homogeneous(self, ctx: Context) -> bool:
        held = ctx.get(Applied)
        return held is None or held.applied is None or held.act.homogeneous

    def activation(self, ctx: Context, x: Signal, *args, **kwargs) -> Activation:
        raise NotImplementedError

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
        act = self.activation(ctx, x, *args, **kwargs)
        if x.const is not None:
            return Signal.constant(act.fn(x.const))
        if x.blocks is None:
            out, applied = _map_signal(act, x)
            ctx.put(Applied(act, applied))
            return out
        # A concatenation: each block through f with its own marginal and correlations (after a
        # BatchNorm a max-pooled ReLU block is recentred and skewed, a conv block Gaussian).
        outs, dm2 = [], []
        for part in x.blocks.parts:
            out, applied = _map_signal(act, part)
            outs.append(out)
            dm2.append(torch.ones((1,) * len(part.shape), dtype=DTYPE) if applied is None else applied.dm2)
        whole = apply_activation(act, x)  # the mixture's constants, for the gradient's correlations
        shapes = [p.shape for p in x.blocks.parts]
        ctx.put(Applied(act, replace(whole, dm2=cat_maps(dm2, shapes, 1))))
        out = concat_signals(outs, 1)
        return out.with_(activated=Activated(act, x) if act.monotone else None)

    def fluctuation(self, ctx: Context, inputs: list[Signal], out: Signal) -> Signal:
        x = ctx.args[0]
        stored = ctx.get(Applied)
        if not isinstance(x, Signal) or not x.scatter.fresh or stored is None or stored.applied is None:
            return super().fluctuation(ctx, inputs, out)
        # Right after a weight layer: the channel offsets it drew decide each channel's share.
        act = stored.act
        scale = 1.0 if act.homogeneous else math.sqrt(max(x.mean_m2, 1e-300))
        fwd, bwd = _scatter(act, _key(x.shared.xcorr), _key(scale))
        ctx.put(_GradScatter(bwd / x.scatter.fresh))
        return out.with_(scatter=Scatter(x.scatter.base_logvar + fwd / x.scatter.fresh))

    def grad_fluctuation(self, ctx: Context, grad: Grad, x: Signal) -> float:
        held = ctx.get(_GradScatter)
        return grad.scatter.logvar + (0.0 if held is None else held.logvar)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        if x.const is not None:
            return {}
        stored = ctx.get(Applied)
        if stored is None:
            return {x: Grad(x.shape, grad.live(), x.layout, grad.spatial.without_hidden())}
        act, applied = stored.act, stored.applied
        if applied is None:
            return {x: _identity_backward(act, x, grad)}
        m2 = grad.m2 * applied.dm2
        if grad.pre is not None:
            m2 = m2 + grad.pre
        cov, rho = None, 0.0
        if grad.spatial.cov is not None and x.positions > 1:
            d = x.positions
            scale = math.sqrt(max(x.mean_m2, 1e-300))
            corr = correlation(x.full(), d)
            mask = _map_mask(act, applied, corr, scale) * float(applied.out.dm2)
            cov = grad.spatial.cov * mask.reshape(grad.spatial.cov.shape)
            if x.blocks is not None:
                # Blocks pass different shares (a recentred max-pooled block more than half): the
                # mixture's mask gives the correlations, the blocks' shares the diagonal.
                cov = matched_cov(cov, m2, x.shape, x.layout)
        elif grad.spatial.rho != 0.0 and x.positions > 1:
            # E[f'_p f'_q g_p g_q] = E[f'_p f'_q] E[g_p g_q]; the pre part is already through the mask.
            scale = math.sqrt(max(x.mean_m2, 1e-300))
            through = mean_of(grad.m2 * applied.dm2)
            kept = float(_map_mask(act, applied, float(x.mean_corr()), scale))
            pre = 0.0 if grad.pre is None else mean_of(grad.pre)
            total = through + pre
            rho = grad.spatial.rho * (kept * through + pre) / total if total > 0 else 0.0
        # Both parts went through this mask: the pre part was handed over as already through it.
        return {x: Grad(x.shape, m2, x.layout, Spatial(cov, rho), masked_by=x if act.slope == 0.0 else None)}


def _identity_backward(act: Activation, x: Signal, grad: Grad) -> Grad:
    """The gradient through a ReLU-family f at non-negative inputs, where f is the identity on the values.

    Its derivative is not 1 everywhere: ``f'(x)`` is 1 where ``x > 0`` and the slope where ``x = 0``,
    so the gradient at x keeps the share ``P(x > 0) + a² P(x = 0)`` of what arrives (half, after one
    ReLU). When x is itself a ReLU's output its zeros are exactly that ReLU's inactive inputs: the
    gradient is handed over as already through that mask (``pre``), or the ReLU that made x would
    take its half a second time. A chain of blocks that are identities at initialization (the
    ``zero`` residual policy) is such a chain of ReLUs of ReLUs.
    """
    a = act.slope
    positive = 1.0 if x.dist is None else float(x.dist.w[x.dist.x > 0].sum())
    share = positive + a * a * (1.0 - positive)
    # What a max pool or a sum already took through this mask (``pre``) passes as it is.
    live = grad.m2 * share if grad.pre is None else grad.m2 * share + grad.pre
    same_mask = a == 0.0 and x.activated is not None and x.activated.f.slope == 0.0
    spatial = Spatial(None if grad.spatial.cov is None else grad.spatial.cov * share, grad.spatial.rho)
    if same_mask:
        return Grad(x.shape, torch.zeros_like(live), x.layout, spatial, pre=live, masked_by=x)
    return Grad(x.shape, live, x.layout, spatial, masked_by=x if a == 0.0 else None)


# -- which nodes are activations -------------------------------------------------------------------
_MODULE_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.PReLU,
)


@register_rule(*_MODULE_TYPES)
class ActivationModule(ElementwiseRule):
    def activation(self, ctx: Context, x: Signal, *args, **kwargs) -> Activation:
        m = ctx.module
        if isinstance(m, nn.PReLU):
            slopes = m.weight.detach().to(DTYPE)
            if slopes.numel() > 1 and not torch.allclose(slopes, slopes[0]):
                # Per-channel slopes: the channel mean (exact only where they agree).
                slopes = slopes.mean()
            a = float(slopes.reshape(-1)[0])
            return Activation.probe(f"PReLU({a!r})", lambda t: F.leaky_relu(t, a))
        if hasattr(m, "inplace"):
            # Rebuilt without in-place, since the rule feeds it tensors of its own (once per kind:
            # building a module costs more than the rest of the rule).
            kwargs = _init_kwargs(m)
            key = f"{type(m).__name__}{sorted(kwargs.items())}"
            known = known_activation(key)
            return known if known is not None else Activation.probe(key, type(m)(**kwargs))
        return Activation.probe(repr(m), m)


def _init_kwargs(m: nn.Module) -> dict:
    """Constructor arguments of an activation module, without in-place (we feed it our own tensors)."""
    names = {
        nn.ReLU: (), nn.ReLU6: (), nn.SiLU: (), nn.Hardswish: (), nn.Hardsigmoid: (), nn.Mish: (),
        nn.LeakyReLU: ("negative_slope",), nn.ELU: ("alpha",), nn.CELU: ("alpha",), nn.SELU: (),
        nn.Hardtanh: ("min_val", "max_val"),
    }
    for cls, keys in names.items():
        if type(m) is cls:
            return {k: getattr(m, k) for k in keys}
    return {}


_FUNCTIONS: dict = {
    F.relu: lambda **k: F.relu, torch.relu: lambda **k: torch.relu, F.relu_: lambda **k: F.relu,
    torch.relu_: lambda **k: F.relu, F.relu6: lambda **k: F.relu6,
    F.leaky_relu: lambda negative_slope=0.01, **k: (lambda t: F.leaky_relu(t, negative_slope)),
    F.gelu: lambda approximate="none", **k: (lambda t: F.gelu(t, approximate=approximate)),
    F.silu: lambda **k: F.silu, F.hardswish: lambda **k: F.hardswish, F.hardsigmoid: lambda **k: F.hardsigmoid,
    torch.sigmoid: lambda **k: torch.sigmoid, F.sigmoid: lambda **k: torch.sigmoid,
    torch.tanh: lambda **k: torch.tanh, F.tanh: lambda **k: torch.tanh, F.mish: lambda **k: F.mish,
    F.elu: lambda alpha=1.0, **k: (lambda t: F.elu(t, alpha)), F.selu: lambda **k: F.selu,
    F.softplus: lambda beta=1.0, threshold=20.0, **k: (lambda t: F.softplus(t, beta, threshold)),
    F.hardtanh: lambda min_val=-1.0, max_val=1.0, **k: (lambda t: F.hardtanh(t, min_val, max_val)),
}
_POSITIONAL = {F.leaky_relu: ("negative_slope",), F.elu: ("alpha",), F.softplus: ("beta", "threshold"),
               F.hardtanh: ("min_val", "max_val")}


@register_rule(*_FUNCTIONS)
class ActivationFunction(ElementwiseRule):
    def activation(self, ctx: Context, x: Signal, *args, **kwargs) -> Activation:
        target = ctx.node.target
        params = dict(zip(_POSITIONAL.get(target, ()), args))
        params.update({k: v for k, v in kwargs.items() if k != "inplace"})
        fn = _FUNCTIONS[target](**params)
        key = f"{getattr(target, '__name__', target)}({sorted(params.items())})"
        return Activation.probe(key, fn)


_METHODS = {"relu": F.relu, "relu_": F.relu, "sigmoid": torch.sigmoid, "sigmoid_": torch.sigmoid,
            "tanh": torch.tanh, "tanh_": torch.tanh}


@register_rule(*_METHODS)
class ActivationMethod(ElementwiseRule):
    def activation(self, ctx: Context, x: Signal, *args, **kwargs) -> Activation:
        name = str(ctx.node.target)
        return Activation.probe(name.rstrip("_"), _METHODS[name])
