r"""Transposed convolutions (weight layers) and upsampling: the decoder half of an encoder–decoder.

**Transposed convolution** ``ConvTranspose1d/2d/3d``: input position i with tap t writes output
``o = i·s − p + t·d``. With weights i.i.d. of variance σ², ``E[u_o²] = σ² (C_in/g) Σ_{(i,t) → o} E[x_i²]``:
the second-moment map pushed through the same op with a ones kernel (taps that land outside the
output, cropped by ``padding``, write nothing), which counts every border exactly. Backward it is the
adjoint: a gradient map pulled back through the ones kernel, times ``C_out/g``. Its ε counts the
(input, output) pairs a weight joins, per axis ``Σ_i #{t : 0 ≤ i·s − p + t·d < L_out}``; its true
fan-in is the average number of inputs an output reads, ``ε / M'`` per output channel.
Two outputs read by different taps use different weights: with ``kernel == stride`` (the U-Net's
2×2/2) no two outputs share a weight and the output is uncorrelated between positions.

**Upsampling** (``nn.Upsample``, ``F.interpolate``): nearest copies elements, so the second-moment
map is upsampled the same way and a conv after it sees the same sums (the copies are perfectly
correlated, which the one correlation ``rho`` takes up). (Bi/tri)linear interpolation is
``y = A x`` with A separable per axis: ``E[y_o²] = (1 − ρ) Σ_a A_oa² m_a + ρ (Σ_a A_oa √m_a)²`` for
inputs of equal correlation ρ; backward the same with Aᵀ and the gradient's correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.geometry import prod
from initscope.rules.base import Context, LayerGeometry, Rule, WeightRule, bind
from initscope.rules.conv import _group_sum, _per_channel, _tuple
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE
from initscope.stats.signal import Grad, Shared, Signal, Spatial, compact, shrink

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class TransposedSpec:
    c_in: int
    c_out: int
    groups: int
    in_spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def dims(self) -> int:
        return len(self.kernel)

    def ones(self, m: Tensor) -> Tensor:
        """The op with a ones kernel on a ``(G or 1, *spatial)`` map."""
        k = torch.ones((1, 1, *self.kernel), dtype=m.dtype)
        out = _CONV_T[self.dims](m.unsqueeze(1), k, None, self.stride, self.padding, self.output_padding, 1,
                                 self.dilation)
        return out.squeeze(1)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(self.ones(torch.zeros((1, *self.in_spatial), dtype=DTYPE)).shape[1:])

    def taps_per_axis(self) -> list[int]:
        out = self.out_spatial
        counts = []
        for n, k, s, p, d, lo in zip(self.in_spatial, self.kernel, self.stride, self.padding, self.dilation, out):
            i = torch.arange(n).unsqueeze(1)
            t = torch.arange(k).unsqueeze(0)
            o = i * s - p + t * d
            counts.append(int(((o >= 0) & (o < lo)).sum()))
        return counts

    def geometry(self, weight_shape) -> LayerGeometry:
        eps = (self.c_out // self.groups) * self.c_in * prod(self.taps_per_axis())
        m_out = self.c_out * prod(self.out_spatial)
        fan_in = max(1, round(eps / m_out))
        return LayerGeometry(
            kind=f"conv_transpose{self.dims}d",
            weight_shape=tuple(int(s) for s in weight_shape),
            groups=self.groups,
            fan_in=fan_in,
            fan_out=(self.c_out // self.groups) * prod(self.kernel),
            eps=eps,
            m_in=self.c_in * prod(self.in_spatial),
            m_out=m_out,
        )


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeModule(WeightRule):
    def spec(self, ctx: Context) -> TransposedSpec:
        m = ctx.module
        x = self.input_signal(ctx)
        dims = len(m.kernel_size)

        def build() -> TransposedSpec:
            if len(x.shape) != dims + 2:
                raise ValueError(f"a {dims}-d transposed convolution expects a {dims + 2}-d input, got {tuple(x.shape)}")
            out_size = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("output_size")
            if out_size is not None:
                extra = m._output_padding(torch.empty(x.shape, device="meta"), list(out_size), list(m.stride),
                                          list(m.padding), list(m.kernel_size), dims, list(m.dilation))
            else:
                extra = m.output_padding
            return TransposedSpec(int(x.shape[1]), int(m.out_channels), int(m.groups), tuple(int(s) for s in x.shape[2:]),
                                  _tuple(m.kernel_size, dims), _tuple(m.stride, dims), _tuple(m.padding, dims),
                                  _tuple(extra, dims), _tuple(m.dilation, dims))

        return ctx.remember(TransposedSpec, tuple(x.shape), build)

    def weight(self, ctx: Context):
        return ctx.module.weight

    def bias(self, ctx: Context):
        return ctx.module.bias

    def channels(self, ctx: Context) -> int:
        return int(ctx.module.out_channels)

    def geometry(self, ctx: Context, *args, **kwargs) -> LayerGeometry:
        return self.spec(ctx).geometry(self.weight(ctx).shape)

    def forward_unit(self, ctx: Context, *args, **kwargs) -> Signal:
        spec = self.spec(ctx)
        x = self.input_signal(ctx)
        out_shape = torch.Size((x.shape[0], spec.c_out, *spec.out_spatial))
        if ctx.local:
            return Signal.unit(out_shape)
        m = spec.ones(_group_sum(x.m2, x.shape, spec.c_in, spec.groups))
        m2 = shrink(_per_channel(m, spec.c_out, spec.groups))
        # Outputs read by different taps share no weight; with overlapping kernels the input's
        # correlation carries over where taps overlap.
        overlap = max(0.0, 1.0 - prod(spec.stride) / prod(spec.kernel))
        return Signal(out_shape, m2, spatial=Spatial(rho=x.mean_corr() * overlap), shared=Shared(x.shared.xcorr))

    def backward_unit(self, ctx: Context, grad: Grad) -> Grad:
        spec = self.spec(ctx)
        x = self.input_signal(ctx)
        if ctx.local:
            return Grad.unit(x.shape)
        g = _group_sum(grad.total(), grad.shape, spec.c_out, spec.groups)
        g = g.expand(g.shape[0], *spec.out_spatial)
        probe = torch.zeros((g.shape[0], *spec.in_spatial), dtype=DTYPE, requires_grad=True)
        with torch.enable_grad():
            (back,) = torch.autograd.grad(spec.ones(probe), probe, g.to(DTYPE))
        m2 = shrink(_per_channel(back, spec.c_in, spec.groups))
        return Grad(x.shape, m2, spatial=Spatial(rho=grad.mean_corr()))


# -- upsampling ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interp:
    """What an interpolation's forward leaves its backward: per-axis matrices (None for nearest)."""

    mats: tuple | None
    out_spatial: tuple[int, ...]


def _axis_matrix(n_in: int, n_out: int, align_corners: bool | None) -> Tensor:
    eye = torch.eye(n_in, dtype=DTYPE).reshape(n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[:, 0, :].T


def _apply(mats: tuple, m: Tensor) -> Tensor:
    """``m`` (``(*lead, *spatial)``) multiplied along each spatial axis by its matrix."""
    k = len(mats)
    for i, a in enumerate(mats):
        dim = m.ndim - k + i
        m = torch.movedim(torch.tensordot(m, a, dims=([dim], [1])), -1, dim)
    return m


class InterpolateRule(Rule):
    """``F.interpolate`` / ``nn.Upsample``: nearest as a shape op, (bi/tri)linear through A (module doc)."""

    def homogeneous(self, ctx: Context) -> bool:
        return True

    def _params(self, ctx: Context, args, kwargs) -> dict:
        if ctx.module is not None:
            m = ctx.module
            return {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners}
        return bind(args, kwargs, ("size", "scale_factor", "mode", "align_corners"),
                     {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None})

    def _run(self, t: Tensor, p: dict) -> Tensor:
        return F.interpolate(t, size=p["size"], scale_factor=p["scale_factor"], mode=p["mode"],
                             align_corners=p["align_corners"])

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
        p = self._params(ctx, args, kwargs)
        full = compact(x.m2, x.shape).expand(x.shape).contiguous()
        out = self._run(full, p)
        k = len(x.shape) - 2
        out_spatial = tuple(out.shape[2:])
        rho = x.mean_corr()
        if p["mode"] in ("nearest", "nearest-exact"):
            ctx.put(Interp(None, out_spatial))
            n_in, n_out = prod(x.shape[2:]), prod(out_spatial)
            copies = n_out / max(n_in, 1)
            # Pairs of outputs that copy one input are perfectly correlated.
            same = n_out * max(copies - 1.0, 0.0)
            pairs = max(n_out * (n_out - 1), 1)
            rho = (rho * (pairs - same) + same) / pairs
            return Signal(torch.Size(out.shape), shrink(out), spatial=Spatial(rho=rho), shared=Shared(x.shared.xcorr),
                          dist=x.dist)
        if p["mode"] not in ("linear", "bilinear", "trilinear"):
            raise ValueError(f"interpolation mode {p['mode']!r} at {ctx.where!r} is not modelled "
                             "(nearest, linear, bilinear and trilinear are)")
        mats = tuple(_axis_matrix(int(n), int(o), p["align_corners"]) for n, o in zip(x.shape[2:], out_spatial))
        ctx.put(Interp(mats, out_spatial))
        m = compact(x.m2, x.shape).expand(x.shape)
        r = min(max(rho, 0.0), 1.0)
        m2 = (1 - r) * _apply(tuple(a**2 for a in mats), m) + r * _apply(mats, m.sqrt()) ** 2
        # Neighbours mix the same inputs: the one correlation of the output, from the mean of A Aᵀ.
        return Signal(torch.Size(out.shape), shrink(m2), spatial=Spatial(rho=_interp_rho(mats, r)),
                      shared=Shared(x.shared.xcorr), dist=None if k else x.dist)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        held = ctx.get(Interp)
        g = compact(grad.total(), grad.shape).expand(grad.shape).to(DTYPE)
        if held.mats is None:
            probe = torch.zeros(x.shape, dtype=DTYPE, requires_grad=True)
            p = self._params(ctx, ctx.args[1:], ctx.kwargs)
            with torch.enable_grad():
                (back,) = torch.autograd.grad(self._run(probe, p), probe, g)
            return {x: Grad(x.shape, shrink(back), spatial=Spatial(rho=grad.mean_corr()))}
        mats_t = tuple(a.T for a in held.mats)
        r = min(max(grad.mean_corr(), 0.0), 1.0)
        m2 = (1 - r) * _apply(tuple(a**2 for a in mats_t), g) + r * _apply(mats_t, g.sqrt()) ** 2
        return {x: Grad(x.shape, shrink(m2), spatial=Spatial(rho=r))}


def _interp_rho(mats: tuple, rho: float) -> float:
    """Mean correlation between two outputs of ``y = A x`` for inputs of equal correlation rho."""
    c = 1.0
    for a in mats:
        ones = a.sum(1, keepdim=True)
        k = (1 - rho) * (a @ a.T) + rho * (ones @ ones.T)  # A K Aᵀ for K of equal correlation rho
        d = k.diagonal().sqrt()
        corr = k / torch.outer(d, d)
        n = corr.shape[0]
        c *= float((corr.sum() - corr.diagonal().sum()) / max(n * n - n, 1)) if n > 1 else 1.0
    return c


register_rule(F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)(InterpolateRule)
