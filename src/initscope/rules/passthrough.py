"""Ops that move elements without combining them: identities, dropout, and shape ops.

A shape op (view, flatten, permute, slicing, zero padding, chunk, ...) selects or rearranges
elements, so it maps second moments exactly as it maps the tensor: the rule applies the op itself to
the second-moment tensor, which has the tensor's shape (at batch size 1). Backward it is the op's
vector-Jacobian product applied to the gradient's second moments (elements the op spreads to several
places, as ``expand`` does, have their gradients summed as uncorrelated).

Dropout and stochastic depth are modelled as the module runs: the identity in eval mode, and in
training mode (where an initialization is used) the inverted scaling ``y = x m / (1 - p)`` with
``m ~ Bernoulli(1 - p)``, which keeps ``E[y] = E[x]`` but not the second moment (see
:class:`DropoutRule`). Alpha dropout keeps mean and variance by construction and stays the identity.
torchvision's stochastic depth and shape ops are registered by :mod:`initscope.rules.torchvision_layers`.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from initscope.rules.base import Context, Rule
from initscope.rules.merge import concat_signals
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.signal import Activated, Grad, Hidden, Layout, Shared, Signal, Spatial, compact, shrink

class IdentityRule(Rule):
    def homogeneous(self, ctx: Context) -> bool:
        return True

    def forward(self, ctx: Context, x, *args, **kwargs):
        return x.with_() if isinstance(x, Signal) else x

    def backward(self, ctx: Context, grad: Grad) -> dict:
        return {ctx.args[0]: _passed(grad)}


def _passed(grad: Grad) -> Grad:
    """The gradient through an identity: its maps and its own positions' statistics."""
    return Grad(grad.shape, grad.m2, spatial=grad.spatial.without_hidden(), pre=grad.pre)


_IDENTITY_MODULES = (nn.Identity, nn.AlphaDropout, nn.FeatureAlphaDropout)
_IDENTITY_FUNCTIONS = [F.alpha_dropout, F.feature_alpha_dropout, torch.clone]
_IDENTITY_METHODS = ("contiguous", "clone", "float", "double", "to", "type", "type_as", "cpu", "cuda",
                     "requires_grad_")

register_rule(*_IDENTITY_MODULES, *_IDENTITY_FUNCTIONS, *_IDENTITY_METHODS)(IdentityRule)


# -- dropout ---------------------------------------------------------------------------------------
# What one Bernoulli draw of the mask covers: one element, one (sample, channel) map, one sample (stochastic
# depth's "row" mode), or the whole batch (its "batch" mode).
_DROPOUT_MODULES = {nn.Dropout: "element", nn.Dropout1d: "channel", nn.Dropout2d: "channel",
                    nn.Dropout3d: "channel"}
_DROPOUT_FUNCTIONS = {F.dropout: "element", F.dropout1d: "channel", F.dropout2d: "channel",
                      F.dropout3d: "channel"}


def _arg(ctx: Context, index: int, name: str, default: Any) -> Any:
    if name in ctx.kwargs:
        return ctx.kwargs[name]
    return ctx.args[index] if len(ctx.args) > index else default


@register_rule(*_DROPOUT_MODULES, *_DROPOUT_FUNCTIONS)
class DropoutRule(Rule):
    r"""Dropout and stochastic depth in training mode: ``y = x m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    With ``k = 1 - p``, ``E[m²] = k`` gives ``E[y²] = E[x²] / k`` and, backward, ``E[(∂L/∂x)²] =
    E[(∂L/∂y)²] / k``: the identity the expected network suggests under-predicts both by ``1/k``
    (EfficientNet-B0's classifier dropout, p = 0.2: 0.32 bits). Two elements that share one draw of the
    mask keep their correlation (``E[m²]/k² = 1/k`` on both sides); two that draw apart have
    ``E[m m'] = k²``, so their cross moment ``E[x x']`` is unchanged while each second moment grows:

    * element-wise dropout: the diagonal of the spatial covariance grows by ``1/k``, every correlation
      (``rho``, ``xcorr``, ``pooled``) shrinks by ``k``;
    * channel dropout and stochastic depth's ``row`` mode: one draw per map (per sample), so the spatial
      covariance grows by ``1/k`` as a whole and only the cross-sample ``xcorr``/``pooled`` shrink;
    * stochastic depth's ``batch`` mode: one draw for everything, nothing shrinks.

    The marginal is the mixture of ``x / k`` (mass k) and an atom at zero (mass p). A gradient has the
    same covariance structure. Eval mode is the identity: the passes that choose a plan's stds run
    every dropout as in training (``Context.training``), the predictions follow the module's mode.
    """

    def follows_mode(self, node, module) -> bool:
        # A dropout of p = 0 (timm's default drop_rate) is the identity in both modes.
        if module is not None:
            return float(module.p) > 0.0
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
        return not (isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0)

    def _drop(self, ctx: Context) -> tuple[float, str]:
        """The drop probability (0 when the op is the identity) and what one draw covers."""
        if not ctx.training:
            return 0.0, "element"
        if ctx.module is not None:
            return float(ctx.module.p), _DROPOUT_MODULES[type(ctx.module)]
        return float(_arg(ctx, 1, "p", 0.5)), _DROPOUT_FUNCTIONS[ctx.node.target]

    def forward(self, ctx: Context, x, *args, **kwargs):
        if not isinstance(x, Signal):
            return x
        p, unit = self._drop(ctx)
        if p <= 0.0 or x.const is not None:
            return x.with_()
        if p >= 1.0:
            return Signal(x.shape, torch.zeros_like(compact(x.m2, x.shape)), x.layout)
        k = 1.0 - p
        cov = x.spatial.cov
        if cov is not None:
            cov = _grow_diagonal(cov, x.positions, 1.0 / k) if unit == "element" else cov / k
        cross = 1.0 if unit == "batch" else k  # what the cross-sample correlations keep
        within = k if unit == "element" else 1.0  # what the correlations between positions keep
        base = x.dist if x.dist is not None else Dist.gaussian()
        dist = Dist.mixture([Dist(torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)), base.scale(1.0 / k)],
                            [p, k]).standardized()
        pooled = None if x.shared.pooled is None else x.shared.pooled * cross
        return Signal(x.shape, x.m2 / k, x.layout, Spatial(cov, x.spatial.rho * within),
                      Shared(x.shared.xcorr * cross, pooled), dist=dist)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        p, unit = self._drop(ctx)
        if p <= 0.0:
            return {x: _passed(grad)}
        if p >= 1.0:  # every element dropped: no gradient passes
            return {x: grad.scaled(0.0)}
        k = 1.0 - p
        g = grad.scaled(1.0 / k)
        cov = grad.spatial.cov
        if cov is not None:
            cov = _grow_diagonal(cov, grad.positions, 1.0 / k) if unit == "element" else cov / k
        # A dropped element's gradient is zero at both ends of a pair: off-diagonal terms keep their size.
        rho = grad.spatial.rho * (k if unit == "element" else 1.0)
        return {x: Grad(grad.shape, g.m2, spatial=Spatial(cov, rho), pre=g.pre, dead=g.dead)}


def _grow_diagonal(cov: torch.Tensor, positions: int, factor: float) -> torch.Tensor:
    """A spatial covariance with its diagonal (only) multiplied by ``factor``."""
    m = cov.reshape(positions, positions).clone()
    m.diagonal().mul_(factor)
    return m.reshape(cov.shape)


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


@dataclass(frozen=True)
class KeptPositions:
    """Per output of a shape op, whether every element kept its spatial position (None: not known)."""

    kept: list[bool] | None


class ShapeRule(Rule):
    """Apply the op to the second-moment tensor; backward through its vector-Jacobian product."""

    def homogeneous(self, ctx: Context) -> bool:
        return True

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
        if _picks_from_outputs(ctx, args):
            # ``outs[i]`` of an op with several outputs (x.chunk(2, dim=1)[1]): that output as it is.
            return args[0][args[1]].with_()
        sigs = _signals(args) + _signals(kwargs)
        x = sigs[0]
        consts = all(s.const is not None for s in sigs)
        fn = (lambda s: s.const) if consts else _materialize
        out = self.call(ctx, *_swap(args, fn), **_swap(kwargs, fn))
        if consts:
            return _wrap_const(out)
        kept = None
        single = sum(s.const is None for s in sigs) == 1
        tokens = _token_dim(x) if single else None
        if tokens is not None:
            # One position dim (the tokens of an (N, L, E) tensor, a Conv1d's length): followed through
            # the op, so that the output knows its tokens (heads split off, transposes, unbind).
            layouts = self._track_tokens(ctx, args, kwargs, x, tokens)
            ctx.put(TrackedTokens(layouts))
            return _with_layouts(_wrap(out, x, None), layouts, x)
        if single and x.layout.spatial is None and _hidden_of(x) is not None:
            kept = self._keeps_positions(ctx, args, kwargs, x, _hidden_of(x).shape)
        ctx.put(KeptPositions(kept))
        result = _wrap(out, x, kept)
        if single and x.activated is not None and isinstance(result, Signal):
            # An op that only moves, picks or copies elements commutes with an elementwise f:
            # op(f(u)) = f(op(u)). A sum after it (an option-A shortcut's x[:, :, ::2, ::2]) reads the
            # mask of f through it, as it does after f itself.
            pre = x.activated.pre
            moved = self.call(ctx, *_swap(args, lambda s: _materialize(pre) if s is x else _materialize(s)),
                              **_swap(kwargs, lambda s: _materialize(pre) if s is x else _materialize(s)))
            if isinstance(moved, torch.Tensor) and tuple(moved.shape) == tuple(result.shape):
                result = result.with_(activated=Activated(x.activated.f, _wrap(moved, pre, kept)))
        return result

    def _track_tokens(self, ctx: Context, args, kwargs, x: Signal, dim: int) -> list[Layout | None]:
        """Per output, the layout whose one position dim holds x's tokens (None: they were split up
        or mixed with other dims)."""
        length = int(x.shape[dim])
        shape = [1] * len(x.shape)
        shape[dim] = length
        ids = torch.arange(length, dtype=DTYPE).reshape(shape).expand(x.shape).contiguous()
        out = self.call(ctx, *_swap(args, lambda s: ids if s is x else _materialize(s)),
                        **_swap(kwargs, lambda s: ids if s is x else _materialize(s)))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [_token_layout_of(o, length) for o in outs]

    def _keeps_positions(self, ctx: Context, args, kwargs, x: Signal, spatial: torch.Size) -> list[bool]:
        """For each output of the op, whether every element keeps the spatial position (the last
        ``len(spatial)`` dims) it had in ``x``: the op is run once more, on position numbers."""
        k = len(spatial)
        pattern = torch.arange(spatial.numel(), dtype=DTYPE).reshape(spatial)
        ids = pattern.expand(x.shape).contiguous()
        out = self.call(ctx, *_swap(args, lambda s: ids if s is x else _materialize(s)),
                        **_swap(kwargs, lambda s: ids if s is x else _materialize(s)))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [isinstance(o, torch.Tensor) and o.ndim >= k + 2 and tuple(o.shape[-k:]) == tuple(spatial)
                and torch.equal(o, pattern.expand(o.shape)) for o in outs]

    def backward(self, ctx: Context, grad) -> dict:
        if _picks_from_outputs(ctx, ctx.args):
            return {ctx.args[0][ctx.args[1]]: grad}
        sigs = [s for s in _signals(ctx.args) + _signals(ctx.kwargs) if s.const is None]
        if not sigs:
            # Only constants went in (a class token expanded over the batch): nothing to send back.
            return {}
        primals = {s: _materialize(s).requires_grad_(True) for s in sigs}
        with torch.enable_grad():
            out = self.call(ctx, *_swap(ctx.args, lambda s: primals.get(s, _materialize(s))),
                            **_swap(ctx.kwargs, lambda s: primals.get(s, _materialize(s))))
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            grads = list(grad) if isinstance(grad, (tuple, list)) else [grad]
            pairs = [(o, compact(g.total(), g.shape).expand(o.shape)) for o, g in zip(outs, grads) if g is not None]
            parted = len(sigs) == 1 and len(pairs) == 1 and (grads[0].pre is not None or grads[0].dead is not None)
            got = torch.autograd.grad([o for o, _ in pairs], list(primals.values()), [g for _, g in pairs],
                                      allow_unused=True, retain_graph=parted)
            parts = {}
            if parted:
                # What an activation in front already took through its mask (``pre``), and what sits
                # where it is inactive (``dead``), move with their elements: each part by the same vjp.
                o, g = pairs[0][0], grads[0]
                for name in ("pre", "dead"):
                    m = getattr(g, name)
                    if m is not None:
                        back = torch.autograd.grad(o, primals[sigs[0]], compact(m, g.shape).expand(o.shape),
                                                   allow_unused=True, retain_graph=True)[0]
                        parts[name] = None if back is None else shrink(back.detach())
        tracked = ctx.get(TrackedTokens)
        if tracked is not None:
            return self._token_backward(ctx, grad, sigs, got, tracked)
        held = ctx.get(KeptPositions)
        kept = None if held is None else held.kept
        keep_cov = _keeps_layout(ctx, sigs[0]) if sigs and kept is None else False
        result = {}
        for s, g in zip(primals, got):
            g = torch.zeros((), dtype=DTYPE) if g is None else shrink(g.detach())
            cov, rho, hidden = None, 0.0, None
            if kept is not None and all(kept):
                hidden = _hidden_back(s, outs, grads)
                if hidden is not None and _ordinary(s.shape, hidden.shape):
                    cov, rho, hidden = hidden.cov, hidden.rho, None
            elif keep_cov and not isinstance(grad, (tuple, list)):
                cov, rho = grad.spatial.cov, grad.spatial.rho
            if parts:
                other = sum(p for p in parts.values() if p is not None)
                g = (g - other).clamp(min=0.0)
            result[s] = Grad(s.shape, g, spatial=Spatial(cov, rho, hidden), pre=parts.get("pre"), dead=parts.get("dead"))
        return result

    def _token_backward(self, ctx: Context, grad, sigs: list, got: tuple, tracked: "TrackedTokens") -> dict:
        """Gradients of a shape op on a token tensor: in the input's layout, with the token correlation
        of the outputs that kept the tokens."""
        rho = _token_grad_rho(grad, tracked.layouts) if all(lay is not None for lay in tracked.layouts) else 0.0
        result = {}
        for s, g in zip(sigs, got):
            g = torch.zeros((), dtype=DTYPE) if g is None else shrink(g.detach())
            result[s] = Grad(s.shape, g, s.layout, Spatial(rho=rho))
        return result


@dataclass(frozen=True)
class TrackedTokens:
    """Per output of a shape op on a token tensor, its layout (None where the tokens were mixed)."""

    layouts: list


def _token_dim(x: Signal) -> int | None:
    """The one position dim of a tensor whose layout has a single one of size > 1 (tokens), else None."""
    nd = len(x.shape)
    if nd < 3:
        return None
    if x.layout.spatial is None:
        dims = tuple(range(2, nd))
    else:
        dims = tuple(d % nd for d in x.layout.spatial)
    if len(dims) != 1 or int(x.shape[dims[0]]) < 2:
        return None
    return dims[0]


def _token_layout_of(o: Any, length: int) -> "Layout | None":
    """The layout of a shape op's output ``o`` run on token numbers: its one dim along which they run
    0..L-1 (every other dim constant), with the channel last (first when the tokens are last)."""
    if not isinstance(o, torch.Tensor) or o.ndim < 2:
        return None
    varying = [d for d in range(o.ndim) if o.shape[d] > 1 and not torch.equal(o, o.narrow(d, 0, 1).expand_as(o))]
    if len(varying) != 1 or o.shape[varying[0]] != length:
        return None
    d = varying[0]
    line = o.movedim(d, -1).reshape(-1, length)[0]
    if not torch.equal(line, torch.arange(length, dtype=line.dtype)):
        return None
    return Layout(-1 if d != o.ndim - 1 else 0, (d,))


def _with_layouts(result: Any, layouts: list, x: Signal) -> Any:
    """The op's output Signals with the tracked layouts and x's token correlation where tokens stay
    tokens; the ``(N, C, *spatial)`` layout and no correlation where they were mixed."""
    if isinstance(result, Signal):
        lay = layouts[0] if layouts else None
        if lay is None:
            return result.with_(spatial=Spatial())
        return result.with_(layout=lay, spatial=Spatial(rho=x.spatial.rho), shared=result.shared)
    if isinstance(result, (tuple, list)):
        return type(result)(_with_layouts(r, [layouts[i]] if i < len(layouts) else [], x)
                            for i, r in enumerate(result))
    return result


def _token_grad_rho(grad, layouts: list) -> float:
    """The tokens' gradient correlation, from the outputs that kept the tokens (weighted by size)."""
    grads = list(grad) if isinstance(grad, (tuple, list)) else [grad]
    num = den = 0.0
    for g, lay in zip(grads, layouts):
        if g is None or lay is None:
            continue
        w = g.mean_m2
        num, den = num + g.spatial.rho * w, den + w
    return num / den if den > 0 else 0.0


def _keeps_layout(ctx: Context, x: Signal) -> bool:
    out = ctx.out
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return all(isinstance(o, Signal) and len(o.shape) == len(x.shape) and o.shape[2:] == x.shape[2:] for o in outs) \
        and ctx.node.target not in ("permute", "transpose", torch.permute, torch.transpose, "movedim", "flip", "roll")


def _picks_from_outputs(ctx: Context, args) -> bool:
    return ctx.node.target is operator.getitem and isinstance(args[0], (tuple, list)) \
        and isinstance(args[1], int) and isinstance(args[0][args[1]], Signal)


def _ordinary(shape: torch.Size, spatial: torch.Size) -> bool:
    """Whether ``shape`` is ``(N, C, *spatial)``, the layout the rules read."""
    return len(shape) == 2 + len(spatial) and tuple(shape[2:]) == tuple(spatial)


def _hidden_of(x: Signal | Grad) -> Hidden | None:
    """The spatial statistics ``x`` carries: of its own positions, or hidden by an earlier shape op."""
    if x.spatial.hidden is not None:
        return x.spatial.hidden
    positions = x.spatial_shape
    if not positions:
        return None
    return Hidden(positions, x.spatial.cov, x.spatial.rho)


def _hidden_back(x: Signal, outs: list, grads: list) -> Hidden | None:
    """The spatial statistics of the gradient at ``x`` from those at the op's outputs, when the op
    keeps every element's position: the channel average over outputs, each by its share of ``x``."""
    spatial = _hidden_of(x).shape
    covs, rhos, total = [], 0.0, 0.0
    for o, g in zip(outs, grads):
        if g is None:
            continue
        h = _hidden_of(g)
        if h is None or h.shape != spatial:
            return None
        share = o.numel() / x.shape.numel()
        covs.append(None if h.cov is None else h.cov * share)
        weight = share * g.mean_m2
        rhos, total = rhos + h.rho * weight, total + weight
    if not covs:
        return None
    cov = None if any(c is None for c in covs) else sum(covs)
    return Hidden(spatial, cov, rhos / total if total > 0 else 0.0)


def _wrap(out, x: Signal, kept: list[bool] | None = None, index: int = 0):
    """The Signal of the op's output ``out`` (second moments, the op applied to x's map).

    ``kept`` says, per output, whether the op left every element at its spatial position
    (:meth:`ShapeRule._keeps_positions`); then the spatial statistics go with it, hidden while the
    output's layout is not ``(N, C, *spatial)``. None: not known (several inputs), only an output with
    x's own layout keeps them.
    """
    if isinstance(out, torch.Tensor):
        shape = torch.Size(out.shape)
        if kept is not None:
            hidden = _hidden_of(x)
            if not kept[index]:
                return _moved(out, x, Spatial(rho=x.spatial.rho))
            if _ordinary(shape, hidden.shape):
                return _moved(out, x, Spatial(hidden.cov, hidden.rho))
            return _moved(out, x, Spatial(rho=x.spatial.rho, hidden=hidden))
        same_layout = len(shape) == len(x.shape) and shape[2:] == x.shape[2:]
        return _moved(out, x, Spatial(x.spatial.cov if same_layout else None, x.spatial.rho))
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, x, kept, i) for i, o in enumerate(out))
    return out


def _moved(out: torch.Tensor, x: Signal, spatial: Spatial) -> Signal:
    """The Signal of a shape op's output, whose second moments ``out`` are x's moved: x's marginal and
    its cross-sample share (not its ``pooled`` share, which depends on positions), and ``spatial``."""
    return Signal(torch.Size(out.shape), shrink(out), spatial=spatial, shared=Shared(x.shared.xcorr), dist=x.dist)


def _wrap_const(out):
    if isinstance(out, torch.Tensor):
        return Signal.constant(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_wrap_const(o) for o in out)
    return out


_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    torch.movedim, torch.narrow, torch.chunk, torch.split, torch.flip, torch.roll, torch.t,
                    F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, operator.getitem,
                    torch.unbind, torch.stack, torch.swapaxes, torch.swapdims)
_SHAPE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                  "expand_as", "narrow", "chunk", "split", "flip", "roll", "unflatten", "movedim", "t",
                  "view_as", "reshape_as", "unbind", "__getitem__", "swapaxes", "swapdims")
_SHAPE_MODULES = [nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle]

register_rule(*_SHAPE_FUNCTIONS, *_SHAPE_METHODS, *_SHAPE_MODULES)(ShapeRule)


@register_rule(F.pad)
class PadRule(ShapeRule):
    """Constant padding: zeros add nothing; a value c adds c² where it pads."""

    def forward(self, ctx: Context, x, pad, mode="constant", value=None):
        if mode != "constant":
            raise ValueError(f"F.pad with mode={mode!r} at {ctx.where!r} is not modelled; only constant padding is")
        channels = _channel_padding(x, pad, value)
        if channels is not None:
            return _zero_channels(x, *channels)
        out = F.pad(_materialize(x), pad, "constant", float(value or 0.0) ** 2)
        return _moved(out, x, Spatial(rho=x.spatial.rho))


def _channel_padding(x: Signal, pad, value) -> tuple[int, int] | None:
    """``(before, after)`` when ``F.pad`` adds zero channels to an ``(N, C, *spatial)`` tensor and
    nothing else (a CIFAR ResNet's option-A shortcut); None otherwise."""
    nd = len(x.shape)
    if x.const is not None or x.layout.spatial is not None or nd < 3 or float(value or 0.0) != 0.0:
        return None
    pad = [int(p) for p in pad]
    if len(pad) != 2 * (nd - 1) or any(pad[:-2]) or min(pad[-2:]) < 0 or not any(pad[-2:]):
        return None
    return pad[-2], pad[-1]


def _zero_channels(x: Signal, before: int, after: int) -> Signal:
    """x with zero channels before and after it: a concatenation whose zero blocks keep their own
    (empty) statistics, so that a sum and an activation after it treat the two kinds of channel apart.
    Read as one tensor, the zeros and x's values were one marginal (x's law at half its scale): after
    an option-A shortcut's add every channel's ReLU passed the share of the channels that carry the
    shortcut, and the branch's gradient came out 0.26 bits high (docs/theory.md, section 5)."""
    def zeros(n: int) -> Signal:
        return Signal(torch.Size((x.shape[0], n, *x.shape[2:])), torch.zeros((1,) * len(x.shape), dtype=DTYPE))

    parts = ([zeros(before)] if before else []) + [x] + ([zeros(after)] if after else [])
    return concat_signals(parts, 1)


@register_rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
class PadModule(ShapeRule):
    def forward(self, ctx: Context, x):
        m = ctx.module
        out = F.pad(_materialize(x), m.padding, "constant", float(m.value) ** 2)
        return _moved(out, x, Spatial(rho=x.spatial.rho))

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
