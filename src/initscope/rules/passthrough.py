"""Ops that move elements without combining them: identities, dropout, and shape ops.

A shape op (view, flatten, permute, slicing, zero padding, chunk, ...) selects or rearranges
elements, so it maps second moments exactly as it maps the tensor: the rule applies the op itself to
the second-moment tensor, which has the tensor's shape (at batch size 1). Backward it is the op's
vector-Jacobian product applied to the gradient's second moments (elements the op spreads to several
places, as ``expand`` does, have their gradients summed as uncorrelated).

Dropout and stochastic depth are modelled as the identity: the plan describes the expected network.
"""

from __future__ import annotations

import builtins
import operator
from numbers import Number
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from initscope.rules.base import Context, Rule
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE
from initscope.stats.signal import Grad, Signal, compact, shrink

try:  # torchvision is optional for the core
    from torchvision.ops import stochastic_depth as _stochastic_depth
    from torchvision.ops.misc import Permute as _TVPermute
except ImportError:  # pragma: no cover
    _stochastic_depth, _TVPermute = None, None


class IdentityRule(Rule):
    def forward(self, ctx: Context, x, *args, **kwargs):
        return x.with_() if isinstance(x, Signal) else x

    def backward(self, ctx: Context, grad: Grad) -> dict:
        return {ctx.args[0]: Grad(grad.shape, grad.m2, grad.cov, grad.pre)}


_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_IDENTITY_FUNCTIONS = [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                       torch.clone]
if _stochastic_depth is not None:
    _IDENTITY_FUNCTIONS.append(_stochastic_depth)
_IDENTITY_METHODS = ("contiguous", "clone", "float", "double", "to", "type", "type_as", "cpu", "cuda",
                     "requires_grad_")

register_rule(*_IDENTITY_MODULES, *_IDENTITY_FUNCTIONS, *_IDENTITY_METHODS)(IdentityRule)


# -- shape ops -------------------------------------------------------------------------------------
def _materialize(x: Signal) -> torch.Tensor:
    return compact(x.m2, x.shape).expand(x.shape).contiguous()


def _swap(value: Any, fn) -> Any:
    """Replace every Signal in (nested) args by ``fn(signal)``."""
    if isinstance(value, Signal):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _swap(v, fn) for k, v in value.items()}
    return value


def _signals(value: Any) -> list[Signal]:
    if isinstance(value, Signal):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _signals(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _signals(v)]
    return []


class ShapeRule(Rule):
    """Apply the op to the second-moment tensor; backward through its vector-Jacobian product."""

    def call(self, ctx: Context, *args, **kwargs):
        """Run the node's own op on plain tensors."""
        node = ctx.node
        if node.op == "call_method":
            self_, *rest = args
            return getattr(self_, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return ctx.module(*args, **kwargs)
        return node.target(*args, **kwargs)

    def forward(self, ctx: Context, *args, **kwargs):
        sigs = _signals(args) + _signals(kwargs)
        x = sigs[0]
        consts = all(s.const is not None for s in sigs)
        fn = (lambda s: s.const) if consts else _materialize
        out = self.call(ctx, *_swap(args, fn), **_swap(kwargs, fn))
        if consts:
            return _wrap_const(out)
        return _wrap(out, x)

    def backward(self, ctx: Context, grad) -> dict:
        sigs = [s for s in _signals(ctx.args) + _signals(ctx.kwargs) if s.const is None]
        primals = {s: _materialize(s).requires_grad_(True) for s in sigs}
        with torch.enable_grad():
            out = self.call(ctx, *_swap(ctx.args, lambda s: primals.get(s, _materialize(s))),
                            **_swap(ctx.kwargs, lambda s: primals.get(s, _materialize(s))))
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            grads = list(grad) if isinstance(grad, (tuple, list)) else [grad]
            pairs = [(o, compact(g.total(), g.shape).expand(o.shape)) for o, g in zip(outs, grads) if g is not None]
            got = torch.autograd.grad([o for o, _ in pairs], list(primals.values()), [g for _, g in pairs],
                                      allow_unused=True)
        keep_cov = _keeps_layout(ctx, sigs[0]) if sigs else False
        result = {}
        for s, g in zip(primals, got):
            g = torch.zeros((), dtype=DTYPE) if g is None else shrink(g.detach())
            cov = None
            if keep_cov and not isinstance(grad, (tuple, list)) and grad.cov is not None:
                cov = grad.cov
            result[s] = Grad(s.shape, g, cov)
        return result


def _keeps_layout(ctx: Context, x: Signal) -> bool:
    out = ctx.out
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return all(isinstance(o, Signal) and len(o.shape) == len(x.shape) and o.shape[2:] == x.shape[2:] for o in outs) \
        and ctx.node.target not in ("permute", "transpose", torch.permute, torch.transpose, "movedim", "flip", "roll")


def _wrap(out, x: Signal):
    if isinstance(out, torch.Tensor):
        shape = torch.Size(out.shape)
        same_layout = len(shape) == len(x.shape) and shape[2:] == x.shape[2:]
        return Signal(shape, shrink(out), cov=x.cov if same_layout else None, rho=x.rho, xcorr=x.xcorr, dist=x.dist)
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, x) for o in out)
    return out


def _wrap_const(out):
    if isinstance(out, torch.Tensor):
        return Signal.constant(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap_const(o) for o in out)
    return out


_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    torch.movedim, torch.narrow, torch.chunk, torch.split, torch.flip, torch.roll, torch.t,
                    F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, operator.getitem,
                    torch.unbind, torch.stack)
_SHAPE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                  "expand_as", "narrow", "chunk", "split", "flip", "roll", "unflatten", "movedim", "t",
                  "view_as", "reshape_as", "unbind", "__getitem__")
_SHAPE_MODULES = [nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle]
if _TVPermute is not None:
    _SHAPE_MODULES.append(_TVPermute)

register_rule(*_SHAPE_FUNCTIONS, *_SHAPE_METHODS, *_SHAPE_MODULES)(ShapeRule)


@register_rule(F.pad)
class PadRule(ShapeRule):
    """Constant padding: zeros add nothing; a value c adds c² where it pads."""

    def forward(self, ctx: Context, x, pad, mode="constant", value=None):
        if mode != "constant":
            raise ValueError(f"F.pad with mode={mode!r} at {ctx.where!r} is not modelled; only constant padding is")
        out = F.pad(_materialize(x), pad, "constant", float(value or 0.0) ** 2)
        return Signal(torch.Size(out.shape), shrink(out), rho=x.rho, xcorr=x.xcorr, dist=x.dist)


@register_rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
class PadModule(ShapeRule):
    def forward(self, ctx: Context, x):
        m = ctx.module
        out = F.pad(_materialize(x), m.padding, "constant", float(m.value) ** 2)
        return Signal(torch.Size(out.shape), shrink(out), rho=x.rho, xcorr=x.xcorr, dist=x.dist)

    def call(self, ctx: Context, x):
        return F.pad(x, ctx.module.padding, "constant", 0.0)


# -- ops whose value is not a tensor ---------------------------------------------------------------
class MetaRule(Rule):
    """``x.size()``, ``x.dim()``, ``x.shape``: answered from the Signal's shape."""

    def forward(self, ctx: Context, x, *args, **kwargs):
        node = ctx.node
        name = node.target if node.op == "call_method" else args[0]
        shape = torch.Size(x.shape)
        if name == "size":
            return shape if not args else shape[args[0]]
        if name in ("dim", "ndimension", "ndim"):
            return len(shape)
        if name == "numel":
            return shape.numel()
        if name == "shape":
            return shape
        if name == "dtype":
            return torch.float32
        if name == "device":
            return torch.device("cpu")
        if name == "is_cuda":
            return False
        raise ValueError(f"attribute {name!r} of a tensor at {ctx.where!r} is not modelled")

    def backward(self, ctx: Context, grad) -> dict:
        return {}


register_rule("size", "dim", "ndimension", "numel")(MetaRule)


@register_rule(builtins.getattr)
class GetattrRule(MetaRule):
    def forward(self, ctx: Context, x, name, *default):
        if not isinstance(x, Signal):
            return getattr(x, name, *default)
        return super().forward(ctx, x, name)


def is_number(v: Any) -> bool:
    return isinstance(v, Number)
