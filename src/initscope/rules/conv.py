"""Convolution and linear layers: the weight layers.

With weights i.i.d. of variance σ² and independent of the input, an output of a conv is
``u_p = Σ_{c, t} w_{c,t} x_{c, p+t}`` and, whatever the input's correlations,
``E[u_p²] = σ² Σ_{c,t} E[x_{c,p+t}²]`` (taps on zero padding read nothing). Per position this is a
ones-kernel convolution of the second-moment map: exact border counts, position by position. Its
average over outputs is ``σ² τ ε / M'`` for a uniform input of second moment τ, the ASV formula.
Backward, ``E[(∂L/∂x_j)²] = σ² Σ_{i,t: i+t=j} E[(∂L/∂u_i)²]``: the transposed map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.geometry import Axis, prod
from initscope.rules.base import Context, LayerGeometry, WeightRule
from initscope.rules.registry import register_rule
from initscope.stats.maps import apply_axes, apply_axes_t, tied_taps, tied_taps_t
from initscope.stats.signal import CHANNELS_FIRST, Grad, Layout, Shared, Signal, Spatial, compact


def _tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 else value


def _padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    dims = len(kernel)
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":
        # As torch does for 'same': the odd extra column goes after.
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, dims)]


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's channel grouping and its per-axis geometry."""

    c_in: int
    c_out: int
    groups: int
    axes: tuple[Axis, ...]

    @staticmethod
    def build(in_shape, weight_shape, stride, padding, dilation, groups, padding_mode="zeros") -> "ConvSpec":
        dims = len(weight_shape) - 2
        if len(in_shape) != dims + 2:
            raise ValueError(
                f"a {dims}-d convolution expects a {dims + 2}-d input (N, C, ...), got shape {tuple(in_shape)}"
            )
        c_out, c_in_g = int(weight_shape[0]), int(weight_shape[1])
        c_in = int(in_shape[1])
        if c_in != c_in_g * groups:
            raise ValueError(
                f"input has {c_in} channels but the weight {tuple(weight_shape)} with groups={groups} expects {c_in_g * groups}"
            )
        kernel = tuple(int(k) for k in weight_shape[2:])
        stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
        pads = _padding(padding, kernel, dilation)
        axes = tuple(
            Axis.of(int(in_shape[2 + i]), kernel[i], stride[i], dilation[i], pads[i][0], pads[i][1], padding_mode)
            for i in range(dims)
        )
        return ConvSpec(c_in, c_out, groups, axes)

    @cached_property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(a.out for a in self.axes)

    @cached_property
    def pointwise(self) -> bool:
        """A 1x1 (stride 1, unpadded) conv: positions pass one to one, only channels mix."""
        return all(a.identity for a in self.axes)

    @property
    def kernel_size(self) -> int:
        return prod(a.kernel for a in self.axes)

    def eps(self) -> int:
        return self.c_out * (self.c_in // self.groups) * prod(a.tap_count() for a in self.axes)

    def geometry(self, kind: str, weight_shape) -> LayerGeometry:
        k = self.kernel_size
        return LayerGeometry(
            kind=kind,
            weight_shape=tuple(int(s) for s in weight_shape),
            groups=self.groups,
            fan_in=(self.c_in // self.groups) * k,
            fan_out=(self.c_out // self.groups) * k,
            eps=self.eps(),
            m_in=self.c_in * prod(a.length for a in self.axes),
            m_out=self.c_out * prod(self.out_spatial),
        )


def _group_sum(m2: Tensor, shape: torch.Size, channels: int, groups: int) -> Tensor:
    """Sum an elementwise map over the channels of each group: ``(G or 1, *spatial)``."""
    m = compact(m2, shape)[0]
    spatial = tuple(shape[2:])
    if m.shape[0] == 1:
        return (channels // groups) * m.expand(1, *spatial)
    return m.expand(channels, *spatial).reshape(groups, channels // groups, *spatial).sum(1)


def _per_channel(m: Tensor, channels: int, groups: int) -> Tensor:
    """Spread a ``(G or 1, *spatial)`` map over the channels of each group: ``(1, C or 1, *spatial)``."""
    if m.shape[0] == 1:
        return m.unsqueeze(0)
    return m.repeat_interleave(channels // groups, dim=0).unsqueeze(0)


def conv_forward_unit(ctx: Context, x: Signal, spec: ConvSpec) -> Signal:
    out_shape = torch.Size((x.shape[0], spec.c_out, *spec.out_spatial))
    if ctx.local:
        return Signal.unit(out_shape)
    m = _group_sum(x.m2, x.shape, spec.c_in, spec.groups)
    if not spec.pointwise:
        m = apply_axes(m, [a.counts for a in spec.axes])
    m2 = _per_channel(m, spec.c_out, spec.groups)
    cov, rho = None, x.spatial.rho
    out_positions = prod(spec.out_spatial)
    if ctx.keep_cov(out_positions) and x.positions <= 16 * ctx.max_cov:
        scale = spec.c_in // spec.groups
        k = x.full()
        cov = scale * (k if spec.pointwise else tied_taps(k, [a.taps for a in spec.axes]))
    elif x.spatial.cov is not None:
        rho = x.mean_corr()
    return Signal(out_shape, m2, spatial=Spatial(cov, rho), shared=Shared(x.shared.xcorr, _pooled_share(x, spec)))


def _pooled_share(x: Signal, spec: ConvSpec) -> float | None:
    r"""The share of the output's second moment in each channel's mean over samples and positions.

    Output channel c's mean is ``Σ_t w_t Σ_p μ_{p+t}`` (taps on padding read nothing), so the weights
    of one tap are summed over only the positions where that tap is valid: with μ the inputs' mean map
    (``sqrt(xcorr m2)`` per position) the share is ``Σ_t (Σ_p μ_{p+t})² / (P Σ_p Σ_t E[x²_{p+t}])``,
    ``xcorr`` itself on a map without borders. On a 2×2 map under a 3×3 kernel it is 9/16 of ``xcorr``.
    """
    if spec.pointwise or x.shared.xcorr <= 0 or not spec.axes:
        return None
    m = x.channel_map()
    per_tap = apply_axes(m.sqrt(), [a.reads for a in spec.axes])
    total = float(apply_axes(m, [a.counts for a in spec.axes]).sum())
    positions = prod(spec.out_spatial)
    if total <= 0:
        return None
    return x.shared.xcorr * float((per_tap**2).sum()) / (positions * total)


def conv_backward_unit(ctx: Context, x: Signal, spec: ConvSpec, grad: Grad) -> Grad:
    if ctx.local:
        return Grad.unit(x.shape)
    g = _group_sum(grad.total(), grad.shape, spec.c_out, spec.groups)
    if not spec.pointwise:
        g = apply_axes_t(g, [a.counts for a in spec.axes])
    m2 = _per_channel(g, spec.c_in, spec.groups)
    cov, rho = None, 0.0
    if grad.spatial.cov is not None and ctx.keep_cov(x.positions):
        scale = spec.c_out // spec.groups
        if spec.pointwise:
            cov = scale * grad.spatial.cov
        else:
            cov = scale * tied_taps_t(grad.spatial.cov, [a.taps for a in spec.axes], [a.length for a in spec.axes])
    elif x.positions > 1:
        # Independent weights: E[g'_p g'_q] = v Σ_o Σ_t E[g_{o,p+t} g_{o,q+t}], each pair moved by the
        # same taps as the diagonal, so the average correlation carries over (borders aside).
        rho = grad.mean_corr()
    return Grad(x.shape, m2, spatial=Spatial(cov, rho))


class _ConvBase(WeightRule):
    def spec(self, ctx: Context) -> ConvSpec:
        raise NotImplementedError

    def kind(self, ctx: Context) -> str:
        return f"conv{len(self.weight(ctx).shape) - 2}d"

    def geometry(self, ctx: Context, *args, **kwargs) -> LayerGeometry:
        return self.spec(ctx).geometry(self.kind(ctx), self.weight(ctx).shape)

    def forward_unit(self, ctx: Context, *args, **kwargs) -> Signal:
        return conv_forward_unit(ctx, self.input_signal(ctx), self.spec(ctx))

    def backward_unit(self, ctx: Context, grad: Grad) -> Grad:
        return conv_backward_unit(ctx, self.input_signal(ctx), self.spec(ctx), grad)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvModule(_ConvBase):
    def spec(self, ctx: Context) -> ConvSpec:
        m = ctx.module
        return ctx.remember(ConvSpec, tuple(self.input_signal(ctx).shape), lambda: ConvSpec.build(
            self.input_signal(ctx).shape, m.weight.shape, m.stride, m.padding, m.dilation, m.groups, m.padding_mode))

    def weight(self, ctx: Context):
        return ctx.module.weight

    def bias(self, ctx: Context):
        return ctx.module.bias


class _FunctionalWeights:
    """Weights passed to ``F.conv*d`` / ``F.linear`` from a parameter (a ``get_attr`` node)."""

    @staticmethod
    def param(ctx: Context, index: int, key: str):
        node = ctx.node.args[index] if len(ctx.node.args) > index else ctx.node.kwargs.get(key)
        if node is None:
            return None
        if getattr(node, "op", None) != "get_attr":
            raise TypeError(
                f"{key} of {ctx.node.format_node()} is computed in the forward pass, not a parameter; "
                "initscope can only initialize weights it can write: register a rule for the module that computes it"
            )
        return node.meta["initscope_param"]


def _arg(ctx: Context, index: int, key: str, default):
    if len(ctx.args) > index:
        return ctx.args[index]
    return ctx.kwargs.get(key, default)


@register_rule(F.conv1d, F.conv2d, F.conv3d)
class ConvFunction(_ConvBase, _FunctionalWeights):
    def spec(self, ctx: Context) -> ConvSpec:
        return ctx.remember(ConvSpec, tuple(self.input_signal(ctx).shape), lambda: ConvSpec.build(
            self.input_signal(ctx).shape,
            self.weight(ctx).shape,
            _arg(ctx, 3, "stride", 1),
            _arg(ctx, 4, "padding", 0),
            _arg(ctx, 5, "dilation", 1),
            _arg(ctx, 6, "groups", 1),
        ))

    def weight(self, ctx: Context):
        return self.param(ctx, 1, "weight")

    def bias(self, ctx: Context):
        return self.param(ctx, 2, "bias")


def linear_forward_unit(ctx: Context, x: Signal, in_features: int, out_features: int) -> Signal:
    if x.shape[-1] != in_features:
        raise ValueError(f"a Linear layer with in_features={in_features} got an input of shape {tuple(x.shape)}")
    out_shape = torch.Size((*x.shape[:-1], out_features))
    if ctx.local:
        return Signal.unit(out_shape)
    m = compact(x.m2, x.shape)
    m2 = in_features * m.mean(dim=-1, keepdim=True) if m.shape[-1] > 1 else in_features * m
    return Signal(out_shape, m2, _linear_layout(x), spatial=Spatial(rho=x.spatial.rho), shared=Shared(x.shared.xcorr))


def _linear_layout(x: Signal) -> Layout:
    """A Linear mixes the last dim: on a token tensor ``(N, L, E)`` the tokens are its positions, and
    so they stay (a layout that names the positions is kept)."""
    if x.layout.spatial is not None:
        return x.layout
    if len(x.shape) == 3:
        return Layout(-1, (1,))
    return CHANNELS_FIRST


def linear_backward_unit(ctx: Context, x: Signal, out_features: int, grad: Grad) -> Grad:
    if ctx.local:
        return Grad.unit(x.shape)
    g = compact(grad.total(), grad.shape)
    g = out_features * g.mean(dim=-1, keepdim=True) if g.shape[-1] > 1 else out_features * g
    # The same weights at every token: the tokens' gradient correlation carries over.
    rho = grad.spatial.rho if x.layout.spatial is not None else 0.0
    return Grad(x.shape, g, x.layout, Spatial(rho=rho))


class _LinearBase(WeightRule):
    def geometry(self, ctx: Context, *args, **kwargs) -> LayerGeometry:
        out_f, in_f = (int(s) for s in self.weight(ctx).shape)
        x = self.input_signal(ctx)
        rows = math.prod(x.shape[1:-1]) if len(x.shape) > 2 else 1
        return LayerGeometry("linear", (out_f, in_f), 1, in_f, out_f, in_f * out_f * rows, in_f * rows, out_f * rows)

    def forward_unit(self, ctx: Context, *args, **kwargs) -> Signal:
        out_f, in_f = self.weight(ctx).shape
        return linear_forward_unit(ctx, self.input_signal(ctx), int(in_f), int(out_f))

    def backward_unit(self, ctx: Context, grad: Grad) -> Grad:
        return linear_backward_unit(ctx, self.input_signal(ctx), int(self.weight(ctx).shape[0]), grad)


@register_rule(nn.Linear)
class LinearModule(_LinearBase):
    def weight(self, ctx: Context):
        return ctx.module.weight

    def bias(self, ctx: Context):
        return ctx.module.bias


@register_rule(F.linear)
class LinearFunction(_LinearBase, _FunctionalWeights):
    def weight(self, ctx: Context):
        return self.param(ctx, 1, "weight")

    def bias(self, ctx: Context):
        return self.param(ctx, 2, "bias")


class StandardizedConv(ConvModule):
    r"""A conv whose forward standardizes its weight (timm's ``StdConv2d``, ``ScaledStdConv2d``).

    Each output channel's weights are made zero-mean with unit variance (``StdConv2d``), or variance
    ``(gain·γ)²/fan_in`` (``ScaledStdConv2d``, ``scale = γ/√fan_in``), before the conv, so the
    planned std does not reach the output: the op computes with that fixed variance forward and
    backward (:meth:`effective_var`). initscope still plans and writes the underlying parameter
    (``weight``), which is what the model trains.
    """

    def forward_unit(self, ctx: Context, *args, **kwargs) -> Signal:
        # Each output channel's standardized weights sum to zero over its fan-in, so what every tap of a
        # window reads alike (the marginal's mean, after an activation) adds nothing to the output.
        return conv_forward_unit(ctx, _centred(self.input_signal(ctx)), self.spec(ctx))

    def effective_var(self, ctx: Context, var: float) -> float:
        m = ctx.module
        gain = getattr(m, "gain", None)
        if gain is None:
            return 1.0
        g2 = float((gain.detach().to("cpu", torch.float64) ** 2).mean())
        return g2 * float(m.scale) ** 2

    def spec(self, ctx: Context) -> ConvSpec:
        m = ctx.module
        x = self.input_signal(ctx)
        padding = m.padding
        if getattr(m, "same_pad", False):
            padding = "same"
        return ctx.remember(ConvSpec, tuple(x.shape), lambda: ConvSpec.build(
            x.shape, m.weight.shape, m.stride, padding, m.dilation, m.groups, m.padding_mode))


def _centred(x: Signal) -> Signal:
    r"""The statistics of ``x − E[x]`` when the marginal's mean is the same fraction f of every element's
    root second moment (``mean_fraction``): ``m2 (1 − f²)``, ``f² √(m_p m_q)`` off the covariance, and the
    shares (``rho``, ``xcorr``, ``pooled``) of the rest. For a zero-sum kernel (a standardized weight)
    ``E[(Σ_k w_k x_k)²] = v (Σ_k E[x_k²] − E[(Σ_k x_k)²]/K)``, whose largest part is this."""
    f2 = x.mean_fraction**2
    if f2 <= 0 or x.const is not None:
        return x
    keep = 1.0 - f2

    def share(r: float) -> float:
        return min(max((r - f2) / keep, 0.0), 1.0)

    cov = x.spatial.cov
    if cov is not None:
        s = x.channel_map().reshape(-1).sqrt()
        cov = cov - f2 * torch.outer(s, s).reshape(cov.shape)
    pooled = x.shared.pooled
    return x.with_(m2=x.m2 * keep, spatial=Spatial(cov, share(x.spatial.rho)),
                   shared=Shared(share(x.shared.xcorr), None if pooled is None else share(pooled)), dist=None)
