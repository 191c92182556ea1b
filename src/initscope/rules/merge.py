"""Ops that merge tensors: residual add, subtraction, concatenation, SE-style multiplication.

**Add** ``y = a + b``: ``E[y²] = E[a²] + E[b²] + 2 E[ab]``. Two tensors from different weight layers
share no weights; if one of them is zero-mean over its weights (a conv output) the cross term
vanishes, and for two non-negative ones (two ReLU outputs) it is ``E[a] E[b]``. Backward, the
gradient reaches both unchanged.

**Concatenation** stacks second-moment maps; its spatial correlation is the channel-weighted mean.
Over channels it also keeps its blocks (``Signal.blocks``): a BatchNorm or an activation after it
treats each block with its own statistics (see :func:`concat_signals`).

**Multiplication** ``x * s`` by an independent tensor (a squeeze-excitation gate, a layer scale):
``E[x² s²] = E[x²] E[s²]``; the gradient at x is scaled by ``E[s²]``, the gradient at s sums over the
positions s was broadcast to, with the correlations of those positions.
"""

from __future__ import annotations

import math
import operator
from numbers import Number
from typing import Any

import torch
from torch import Tensor

from initscope.rules.base import Context, Rule
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.gaussian import normal_cdf
from initscope.stats.signal import (Activated, Blocks, Grad, Shared, Signal, Spatial, cat_maps, channel_blocks,
                                    channel_map, compact, matched_cov, mean_of)


def broadcast_shape(*shapes: torch.Size) -> torch.Size:
    # Plain Python: torch.broadcast_shapes goes through torch._refs and costs milliseconds a call.
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, n in enumerate(shape, start=ndim - len(shape)):
            if n != 1:
                if out[i] not in (1, n):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = n
    return torch.Size(out)


def reduce_to(m2: Tensor, out_shape: torch.Size, in_shape: torch.Size) -> Tensor:
    """Send an elementwise gradient map back to a broadcast input: sum over the dims it was spread on.

    The summed gradients are taken as uncorrelated. Dims the map holds at size 1 stay so (a sum of
    equal terms is a product), so a channel-uniform map stays channel-uniform.
    """
    m = compact(m2, out_shape)
    lead = len(out_shape) - len(in_shape)
    factor = 1
    for i, o in enumerate(out_shape):
        n = in_shape[i - lead] if i >= lead else 1
        if n == 1 and o != 1:
            if m.shape[i] == 1:
                factor *= o
            else:
                m = m.sum(dim=i, keepdim=True)
    if lead:
        m = m.reshape(m.shape[lead:])
    return m * factor if factor != 1 else m


def _mean_map(x: Signal) -> Tensor:
    """``E[x]`` per element (zero for a zero-mean Gaussian)."""
    if x.const is not None:
        return x.const
    if x.dist is None or x.dist.mean == 0.0:
        return torch.zeros((), dtype=DTYPE)
    return x.dist.mean * compact(x.m2, x.shape).sqrt()


def _as_signal(v) -> Signal:
    if isinstance(v, Signal):
        return v
    return Signal.constant(torch.as_tensor(float(v), dtype=DTYPE))


def _sum_dist(a: Signal, b: Signal, alpha: float) -> Dist | None:
    """Standardized marginal of ``a + alpha b`` for independent a and b."""
    if a.const is not None and b.const is not None:
        return None
    sa = math.sqrt(max(a.mean_m2, 0.0))
    sb = alpha * math.sqrt(max(b.mean_m2, 0.0))
    if b.const is not None:
        return (a.dist or Dist.gaussian()).scale(sa).shift(alpha * mean_of(b.const)).standardized()
    if a.const is not None:
        return (b.dist or Dist.gaussian()).scale(sb).shift(mean_of(a.const)).standardized()
    if a.dist is None and b.dist is None:
        return None
    if b.dist is None:
        return a.dist.scale(sa).add_gaussian(abs(sb)).standardized()
    if a.dist is None:
        return b.dist.scale(sb).add_gaussian(sa).standardized()
    return a.dist.scale(sa).add(b.dist.scale(sb)).standardized()


def add_signals(a: Signal, b: Signal, alpha: float = 1.0, same: bool = False) -> Signal:
    if not same:
        by_blocks = _add_by_blocks(a, b, alpha)
        if by_blocks is not None:
            return by_blocks
    shape = broadcast_shape(a.shape, b.shape)
    ma, mb = compact(a.m2, shape), compact(b.m2, shape)
    if same:
        # x + alpha x: fully coherent.
        return a.scaled((1 + alpha) ** 2)
    mua, mub = _mean_map(a), _mean_map(b)
    cross = 2 * alpha * mua * mub
    m2 = (ma + alpha**2 * mb + cross).clamp(min=0)
    total = max(mean_of(m2), 1e-300)
    c = mean_of(torch.as_tensor(cross, dtype=DTYPE))
    cov = None
    spatial_a = a.const is None and tuple(a.shape) == tuple(shape)
    spatial_b = b.const is None and tuple(b.shape) == tuple(shape)
    if (a.spatial.cov is not None or b.spatial.cov is not None) and spatial_a and spatial_b:
        cov = a.full() + alpha**2 * b.full() + c
    elif a.spatial.cov is not None and spatial_a and b.positions <= 1:
        cov = a.spatial.cov + alpha**2 * mean_of(mb) + c
    elif b.spatial.cov is not None and spatial_b and a.positions <= 1:
        cov = alpha**2 * b.spatial.cov + mean_of(ma) + c
    rho = (a.spatial.rho * mean_of(ma) + alpha**2 * b.spatial.rho * mean_of(mb) + c) / total
    xcorr = (a.shared.xcorr * mean_of(ma) + alpha**2 * b.shared.xcorr * mean_of(mb) + c) / total
    layout = a.layout if a.const is None else b.layout
    return Signal(shape, m2, layout, Spatial(cov, min(rho, 1.0)), Shared(min(xcorr, 1.0)), dist=_sum_dist(a, b, alpha))


def _channel_slice(x: Signal, count: int) -> Signal:
    """A channel-uniform Signal's statistics on ``count`` of its channels."""
    shape = torch.Size((x.shape[0], count, *x.shape[2:]))
    return x.with_(shape=shape, spatial=x.spatial, shared=x.shared, activated=None, blocks=None)


def _add_by_blocks(a: Signal, b: Signal, alpha: float) -> Signal | None:
    """``a + alpha b`` block by block, when one of them is a concatenation over channels (its blocks
    kept) and the other is the same shape and the same in every channel (a conv's output): each block
    is summed with its own statistics, so that an activation after the sum reads each block's law.
    After a CIFAR ResNet's option-A shortcut the zero channels then hold the branch alone (a Gaussian,
    half of it through the ReLU) and the others the shortcut plus the branch (mostly positive)."""
    if a.const is not None or b.const is not None or tuple(a.shape) != tuple(b.shape) or len(a.shape) < 3:
        return None
    if (a.blocks is None) == (b.blocks is None):
        return None
    blocked, plain = (a, b) if a.blocks is not None else (b, a)
    if plain.layout.spatial is not None or compact(plain.m2, plain.shape).shape[1] != 1:
        return None
    parts = []
    for _, count, part in channel_blocks(blocked):
        other = _channel_slice(plain, count)
        parts.append(add_signals(part, other, alpha) if blocked is a else add_signals(other, part, alpha))
    return concat_signals(parts, 1)


def _grad_for(x: Signal, grad: Grad, factor: float) -> Grad:
    m2 = reduce_to(grad.total() * factor, grad.shape, x.shape)
    same = tuple(x.shape) == tuple(grad.shape)
    cov = grad.spatial.cov * factor if grad.spatial.cov is not None and same else None
    return Grad(x.shape, m2, x.layout, Spatial(cov, grad.spatial.rho if same else 0.0))


class AddRule(Rule):
    """``a + b``, ``a - b``, ``torch.add(a, b, alpha=...)`` and their in-place forms."""

    sign = 1.0

    def forward(self, ctx: Context, a, b, *rest, **kwargs) -> Signal:
        alpha = self.sign * float(kwargs.get("alpha", rest[0] if rest else 1.0))
        a, b = _as_signal(a), _as_signal(b)
        return add_signals(a, b, alpha, same=a is b)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        a, b = ctx.args[0], ctx.args[1]
        alpha = float(ctx.kwargs.get("alpha", ctx.args[2] if len(ctx.args) > 2 else 1.0))
        out = {}
        if isinstance(a, Signal) and isinstance(b, Signal) and a is b:
            return {a: _grad_for(a, grad, (1 + self.sign * alpha) ** 2)}
        if isinstance(a, Signal) and a.const is None:
            out[a] = _shortcut_grad(a, b, alpha**2, grad, ctx.out) or _grad_for(a, grad, 1.0)
        if isinstance(b, Signal) and b.const is None:
            out[b] = _shortcut_grad(b, a, 1.0, grad, ctx.out, own=alpha**2) or _grad_for(b, grad, alpha**2)
        return out


def _shortcut_grad(s: Signal, other: Any, other_factor: float, grad: Grad, out: Any, own: float = 1.0) -> Grad | None:
    """The gradient to a ReLU output ``s = relu(z)`` summed with ``other`` and then through a ReLU.

    With ``y = relu(s + other)``, the gradient reaches ``s`` only where ``s + other > 0``, and ``s``'s
    own ReLU passes it only where ``z > 0``. The two events are correlated (``s + other = z + other``
    wherever ``z > 0``). The gradient that arrives here has been through the mask of ``s + other``;
    of it, ``s``'s ReLU passes the share ``P(z > 0 | s + other > 0)``. Taking the share of the masked
    gradient, not the joint probability of the unmasked one, is what keeps a chain of blocks right:
    the gradient from above is itself larger where ``s + other > 0`` (the next mask agrees), and
    ``z``'s mask depends on what is above only through that event.

    For ``other`` a zero-mean Gaussian independent of z, ``P(z > 0, z + other > 0) =
    E[1(z > 0) Φ(z / σ_other)]``: for Gaussian z that is ``1/4 + asin(sqrt(q_z / (q_z + q_o))) / (2π)``,
    and for the marginal z has after earlier residual sums (a non-negative shortcut plus a branch,
    mostly positive) it is summed over z's points. The gradient is handed over as ``pre`` (already
    through ``s``'s ReLU), so that ReLU adds it without masking it again.
    """
    if grad.masked_by is None or grad.masked_by is not out:
        return None
    if not isinstance(other, Signal) or other.const is not None or other.dist is not None:
        return None
    if not isinstance(out, Signal) or tuple(s.shape) != tuple(grad.shape):
        return None
    arrived = compact(grad.total(), s.shape) * own
    if s.blocks is not None:
        return _blocked_shortcut_grad(s, other, other_factor, grad, out, arrived)
    share = _mask_share(s, other.mean_m2 * other_factor, out)
    if share is None:
        return None
    live = arrived * share
    return Grad(s.shape, torch.zeros_like(live), s.layout, Spatial(rho=grad.mean_corr()), pre=live, dead=arrived - live,
                scatter=grad.scatter)


def _mask_share(s: Signal, q_other: float, out: Signal) -> float | None:
    """``P(z > 0 | s + other > 0)`` for ``s = relu(z)`` and a zero-mean Gaussian ``other`` of second
    moment ``q_other`` (see :func:`_shortcut_grad`); None where s is not a ReLU's output."""
    if s.activated is None or s.activated.f.slope != 0.0:
        return None
    qz, qo = s.activated.pre.mean_m2, max(q_other, 0.0)
    if qz <= 0:
        return None
    z = s.activated.pre.dist
    if z is None:
        joint = 0.25 + math.asin(math.sqrt(qz / (qz + qo))) / (2 * math.pi)
    elif qo == 0:
        joint = float(z.w[z.x > 0].sum())
    else:
        positive = z.x > 0
        joint = float((z.w[positive] * normal_cdf(z.x[positive] * math.sqrt(qz / qo))).sum())
    # P(s + other > 0): the mask the arriving gradient went through.
    passed = 0.5 if out.dist is None else float(out.dist.w[out.dist.x > 0].sum())
    if passed <= 0:
        return None
    return min(joint / passed, 1.0)


def _blocked_shortcut_grad(s: Signal, other: Signal, other_factor: float, grad: Grad, out: Signal,
                           arrived: Tensor) -> Grad | None:
    """:func:`_shortcut_grad` block by block, for a shortcut that is a concatenation over channels (an
    option-A shortcut: zero channels around a subsampled ReLU output) summed by :func:`_add_by_blocks`.
    Each block of the sum went through its own ReLU mask; a block of the shortcut that is a ReLU's
    output gets its share of what arrived there, and a zero block gets none of it (nothing reaches a
    constant). Without this the shortcut's gradient went through its ReLU's mask a second time: 0.34 bits
    low below a stage change of a BatchNorm-free ResNet."""
    if out.blocks is None or len(out.blocks.parts) != len(s.blocks.parts):
        return None
    c = s.layout.channel_dim(len(s.shape))
    if arrived.shape[c] == 1:  # a channel-uniform gradient: every block reads the same map
        size = list(arrived.shape)
        size[c] = int(s.shape[c])
        arrived = arrived.expand(size)
    lives, deads = [], []
    shapes = []
    for (start, count, part), (_, _, summed) in zip(channel_blocks(s), channel_blocks(out)):
        seg = arrived.narrow(c, start, count)
        shapes.append(part.shape)
        if part.const is None and float(compact(part.m2, part.shape).abs().max()) == 0.0:
            lives.append(torch.zeros_like(seg))
            deads.append(seg)
            continue
        share = _mask_share(part, other.mean_m2 * other_factor, summed)
        if share is None:
            return None
        lives.append(seg * share)
        deads.append(seg * (1.0 - share))
    live, dead = cat_maps(lives, shapes, c), cat_maps(deads, shapes, c)
    return Grad(s.shape, torch.zeros_like(live), s.layout, Spatial(rho=grad.mean_corr()), pre=live, dead=dead,
                scatter=grad.scatter)


register_rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__")(AddRule)


@register_rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
class SubRule(AddRule):
    sign = -1.0


@register_rule(operator.neg, torch.neg, "neg")
class NegRule(Rule):
    def forward(self, ctx, x):
        dist = None if x.dist is None else x.dist.scale(-1.0)
        return x.with_(dist=dist, activated=None, const=None if x.const is None else -x.const)

    def backward(self, ctx, grad):
        return {ctx.args[0]: grad.scaled(1.0)}


def _const_m2(v) -> Tensor:
    if isinstance(v, Signal):
        return v.m2 if v.const is None else v.const**2
    return torch.as_tensor(float(v) ** 2, dtype=DTYPE)


def _spanning_first(a: Any, b: Any) -> tuple[Any, Any]:
    """The operands of a product, the one that spans the output's positions first.

    The rule's forward and backward read the first operand as the map ``x`` and the second as the
    factor ``s`` it is scaled by, broadcast over x's positions (a squeeze-excitation gate, a layer
    scale). Which one is written first is up to the model: torchvision's SqueezeExcitation returns
    ``scale * input``. Read in that order, the rule took the gate's ``rho`` (meaningless on a
    1×1 map) and its missing covariance for the product's, dropping the map's spatial covariance, and
    sent the gate its gradient without the cross-position terms ``Σ_{p≠q} E[g_p g_q] E[x_p x_q]``.
    """
    if not isinstance(a, Signal):
        return b, a
    if isinstance(b, Signal) and b.const is None and b.positions > 1 and a.positions <= 1:
        return b, a
    return a, b


def _gate_pairs(grad: Grad, x: Signal) -> float:
    """``E[(Σ_p g_p x_p)²] / Σ_p E[g_p²] E[x_p²]`` for the gradient of a factor broadcast over x's map.

    The gate's gradient sums over every pair of positions, not only the diagonal, and a global pool
    downstream makes the cross-position terms dominant. Exact from the two covariances on small maps;
    on larger ones each is one average correlation: ``Σ_{p≠q} ρ_g ρ_x s_p s_q`` with
    ``s_p = sqrt(E[g_p²] E[x_p²])`` (channel averages).
    """
    d = x.positions
    if grad.spatial.cov is not None and x.spatial.cov is not None:
        gk, xk = grad.spatial.cov.reshape(d, d), x.spatial.cov.reshape(d, d)
        both = float((gk * xk).sum())
        diag = float((gk.diagonal() * xk.diagonal()).sum())
        return both / diag if diag > 0 else 1.0
    corr = grad.mean_corr() * x.mean_corr()
    if corr == 0.0:
        return 1.0
    s = (channel_map(grad.total(), grad.shape, grad.layout) * x.channel_map()).reshape(-1).clamp(min=0.0)
    diag = float(s.sum())
    if diag <= 0:
        return 1.0
    pairs = float(s.sqrt().sum()) ** 2 - diag
    return max(1.0 + corr * pairs / diag, 0.0)


class MulRule(Rule):
    """``a * b`` for a tensor and an independent tensor or constant."""

    def forward(self, ctx: Context, a, b) -> Signal:
        a, b = _spanning_first(a, b)
        if isinstance(b, Number) or (isinstance(b, Signal) and b.const is not None and b.const.numel() == 1):
            c = float(b) if isinstance(b, Number) else float(b.const)
            out = a.scaled(c * c)
            if c < 0 and a.dist is not None:
                out = out.with_(dist=a.dist.scale(-1.0), activated=None)
            return out
        shape = broadcast_shape(a.shape, b.shape)
        mb = _const_m2(b)
        ma = compact(a.m2, shape)
        m2 = ma * compact(mb, shape)
        b_spatial = b.positions > 1 and tuple(b.shape[2:]) == tuple(shape[2:])
        cov = None
        if a.spatial.cov is not None and tuple(a.shape) == tuple(shape):
            if not b_spatial:
                cov = a.spatial.cov * mean_of(mb)
            elif b.spatial.cov is not None:
                cov = a.spatial.cov * b.spatial.cov
        rho = a.spatial.rho * (1.0 if not b_spatial else b.spatial.rho)
        dist = a.dist if not b_spatial else None
        if b.const is not None and bool((b.const < 0).any()):
            dist = None
        xcorr = a.shared.xcorr * (b.shared.xcorr if b.const is None else 1.0)
        return Signal(shape, m2, a.layout, Spatial(cov, rho), Shared(xcorr), dist=dist)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        a, b = _spanning_first(ctx.args[0], ctx.args[1])
        out = {}
        if isinstance(b, Number) or (b.const is not None and b.const.numel() == 1):
            c = float(b) if isinstance(b, Number) else float(b.const)
            out[a] = grad.scaled(c * c)
            return out
        if a.const is None:
            g = reduce_to(grad.total() * compact(_const_m2(b), grad.shape), grad.shape, a.shape)
            cov, rho = None, 0.0
            if tuple(a.shape) == tuple(grad.shape) and not (b.positions > 1):
                # A broadcast factor scales every position of one channel alike.
                cov = None if grad.spatial.cov is None else grad.spatial.cov * mean_of(_const_m2(b))
                rho = grad.spatial.rho
            out[a] = Grad(a.shape, g, spatial=Spatial(cov, rho))
        if b.const is None:
            g = reduce_to(grad.total() * compact(a.m2, grad.shape), grad.shape, b.shape)
            if b.positions <= 1 and a.positions > 1:
                g = g * _gate_pairs(grad, a)
            out[b] = Grad(b.shape, g)
        return out


register_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__")(MulRule)


@register_rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
class DivRule(Rule):
    """``x / c`` for a constant c."""

    def forward(self, ctx: Context, a, b, **kwargs) -> Signal:
        if not isinstance(a, Signal) or (isinstance(b, Signal) and b.const is None):
            raise ValueError(
                f"division at {ctx.where!r} divides by a tensor computed in the forward pass; "
                "initscope models division by constants only: register a rule for the module that does it"
            )
        inv = Signal.constant(1.0 / torch.as_tensor(b.const if isinstance(b, Signal) else float(b), dtype=DTYPE))
        return MulRule().forward(ctx, a, inv)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        a, b = ctx.args[0], ctx.args[1]
        c = b.const if isinstance(b, Signal) else torch.as_tensor(float(b), dtype=DTYPE)
        g = reduce_to(grad.total() / compact(c**2, grad.shape), grad.shape, a.shape)
        one = c.numel() == 1
        cov = None if grad.spatial.cov is None or not one else grad.spatial.cov / float(c) ** 2
        return {a: Grad(a.shape, g, spatial=Spatial(cov, grad.spatial.rho if one else 0.0))}


def _cat_args(tensors, dim) -> tuple[list[Signal], int]:
    tensors = list(tensors)
    nd = len(tensors[0].shape)
    return tensors, dim % nd


def _mixture_dist(tensors: list[Signal], counts: list[int]) -> Dist | None:
    """The standardized marginal of a concatenation: the channel-weighted mixture of its blocks'."""
    # Blocks with the same marginal at the same scale to 0.1 % (every Gaussian block after a
    # BatchNorm, every ReLU of one: they differ by the norm's eps) are one component: a DenseNet layer
    # concatenates up to 32 blocks, mostly alike, and each mixture costs a re-binning.
    groups: dict[tuple[int, int], list] = {}
    for t, n in zip(tensors, counts):
        key = (id(t.dist), round(1000 * math.log(max(t.mean_m2, 1e-300))))
        if key in groups:
            groups[key][1] += n
        else:
            groups[key] = [t, n]
    if len(groups) == 1:
        return tensors[0].dist
    parts = [(t.dist or Dist.gaussian()).scale(math.sqrt(max(t.mean_m2, 0.0))) for t, _ in groups.values()]
    dist = Dist.mixture(parts, [n for _, n in groups.values()]).standardized()
    if all(t.dist is None for t in tensors) and abs(dist.expect(lambda z: z**4) - 3.0) < 0.05:
        return None
    return dist


def concat_signals(tensors: list[Signal], dim: int) -> Signal:
    """The Signal of ``torch.cat(tensors, dim)``.

    The whole tensor is described as the mixture of its blocks: second-moment maps stacked, spatial
    covariance averaged over channels, ``rho``, ``xcorr`` and ``pooled`` averaged by second moment
    (each is a share of it), the marginal a channel-weighted mixture. A concatenation over channels
    also keeps the blocks themselves (:class:`~initscope.stats.signal.Blocks`; those of a block that is
    itself a concatenation, flattened), for the ops that treat channels apart.
    """
    shapes = [t.shape for t in tensors]
    m2 = cat_maps([t.m2 for t in tensors], shapes, dim)
    first = shapes[0]
    shape = torch.Size((*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1:]))
    sizes = [s[dim] * max(t.mean_m2, 0.0) for s, t in zip(shapes, tensors)]
    total = max(sum(sizes), 1e-300)
    weights = [s / total for s in sizes]
    counts = [s[dim] for s in shapes]
    cov = None
    if dim == 1 and all(t.positions > 1 for t in tensors):
        if any(t.spatial.cov is not None for t in tensors):
            cov = sum(t.full() * (n / sum(counts)) for t, n in zip(tensors, counts))
    rho = sum(t.spatial.rho * w for t, w in zip(tensors, weights))
    xcorr = sum(t.shared.xcorr * w for t, w in zip(tensors, weights))
    pooled = None
    if any(t.shared.pooled is not None for t in tensors):
        # What a BatchNorm over the whole would subtract; the blocks' own shares are in ``blocks``.
        pooled = sum(t.shared.batch_mean * w for t, w in zip(tensors, weights))
    dist = _mixture_dist(tensors, counts) if len(tensors) > 1 else tensors[0].dist
    blocks = None
    if dim == 1 and len(shape) >= 2 and len(tensors) > 1 and all(t.const is None for t in tensors):
        blocks = Blocks(tuple(p for t in tensors for p in (t.blocks.parts if t.blocks is not None else (t,))))
    activated = None
    first = tensors[0].activated
    if first is not None and all(t.activated is not None and t.activated.f.key == first.f.key for t in tensors):
        # cat(f(u_1), f(u_2)) = f(cat(u_1, u_2)): a max pool after it reads the pre-activations, as
        # it does after one activation (max relu(u) = relu(max u)). SqueezeNet's fire modules
        # concatenate two ReLU outputs before its max pools; read as one non-Gaussian map, the pools'
        # outputs were predicted 1.0-1.5 bits high.
        activated = Activated(first.f, concat_signals([t.activated.pre for t in tensors], dim))
    # A constant block (a class token) has no layout of its own: the tensors' is the first computed one's.
    layout = next((t.layout for t in tensors if t.const is None), tensors[0].layout)
    return Signal(shape, m2, layout, Spatial(cov, rho), Shared(xcorr, pooled), dist=dist,
                  activated=activated, blocks=blocks)


def _slice(m: Tensor | None, shape: torch.Size, dim: int, start: int, n: int) -> Tensor | None:
    """Entries ``start:start+n`` along ``dim`` of a map left broadcast (a size-1 dim stays as it is)."""
    if m is None:
        return None
    m = compact(m, shape)
    return m.narrow(dim, start, n) if m.shape[dim] > 1 else m


@register_rule(torch.cat, torch.concat, torch.concatenate)
class CatRule(Rule):
    def forward(self, ctx: Context, tensors, dim=0, **kwargs) -> Signal:
        dim = kwargs.get("axis", dim)
        tensors, dim = _cat_args(tensors, dim)
        return concat_signals(tensors, dim)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        tensors = list(ctx.args[0])
        dim = ctx.kwargs.get("axis", ctx.kwargs.get("dim", ctx.args[1] if len(ctx.args) > 1 else 0))
        dim = dim % len(grad.shape)
        out, start = {}, 0
        for t in tensors:
            n = t.shape[dim]
            # The parts stay apart: what a max pool after the concatenation already took through the
            # activations in front (``pre``) must not go through their derivative again.
            m2, pre, dead = (_slice(m, grad.shape, dim, start, n) for m in (grad.m2, grad.pre, grad.dead))
            part = Grad(t.shape, m2, pre=pre, dead=dead)
            start += n
            cov = None
            if dim == 1 and grad.spatial.cov is not None:
                # The whole's covariance is the channel average; this block's diagonal is its own map.
                whole = compact(grad.total(), grad.shape)
                cov = grad.spatial.cov if whole.shape[1] == 1 else matched_cov(grad.spatial.cov, part.total(), t.shape)
            part = part.with_(spatial=Spatial(cov, grad.spatial.rho if dim == 1 else 0.0))
            out[t] = out[t] + part if t in out else part
        return out
