r"""Softmax attention, the softmax itself, and products of two tensors (``matmul``, ``bmm``, ``einsum``).

Scaled dot-product attention (``F.scaled_dot_product_attention``; ``nn.MultiheadAttention`` and
timm's ``Attention`` reach it, see :mod:`initscope.graph.trace`) at initialization. q, k and v are
projections of the tokens by independent weights, so, given the tokens, they are independent
zero-mean fields; across tokens each carries the tokens' correlation ρ (one number, ``spatial.rho``
of a token tensor: :class:`~initscope.stats.signal.Layout` ``(-1, (token dim,))``).

* Logits ``s_ij = q_i·k_j / √d``: ``E[s_ij²] = E[q²] E[k²]`` (the 1/√d cancels the d terms), and
  ``Cov(s_ij, s_i'j') = E[q²]E[k²] C_ii' D_jj'`` with C, D the q and k token correlations. A softmax
  is blind to what a row shares, so it sees logits of variance ``E[q²]E[k²](1 - ρ_k)``, and rows
  that share ``ρ_q(1 - ρ_k)`` of it.
* Weights ``a_ij = softmax_j(s_ij)``: ``Σ_j a_ij = 1`` and ``A₂ = E[Σ_j a_ij²]``, between 1/L (flat)
  and 1 (one-hot); for L Gaussian logits of variance S², ``A₂ ≈ e^{S²}/L`` while that is small.
* Output ``o_i = Σ_j a_ij v_j``: ``E[o_i²] = E[v²] (ρ_v + (1 - ρ_v) A₂)``; the common part ρ_v of v
  passes whole (the weights sum to one), the rest is averaged down by A₂. Two outputs share
  ``ρ_v + (1 - ρ_v) E[Σ_j a_ij a_i'j]``: attention makes tokens alike.
* Backward: ``∂L/∂v_j = Σ_i a_ij g_i`` (what a column of weights collects), and through the softmax
  ``∂L/∂s_ij = a_ij (g_i·v_j - Σ_j' a_ij' g_i·v_j')``, to q and k by the other's values.

The softmax's expectations (A₂, the column sums, the backward through it) have no closed form at
finite L and S². The rule computes them at this Gaussian model by a fixed-seed simulation of the
attention op itself (:func:`simulate`): q, k, v drawn with the propagated per-token second moments and
token correlations, the real softmax, the real backward with the arriving gradient's per-token map
and correlation. Deterministic (one generator seed), so a plan is reproducible; the means over tokens
are used wherever the inputs are token-uniform (noise ~1 %). A token whose map differs from the
others (a class token) is one sample per simulated row: its own statistics carry ~9 % noise (q's
gradient), and up to a factor 1.8 where it is a key that a one-hot softmax rarely picks.

When one Linear projects q, k and v from the same tokens of width E (self-attention; the tracer marks
Linear nodes with their input width, :func:`shared_tokens` follows q, k and v back to them), they are
independent only *given* the tokens: two tokens overlap by ``x_i·x_j/E``, and a sum over keys of
products of two projections (``∂L/∂q_i = Σ_j ∂L/∂s_ij k_j/√d``) collects the overlaps, a factor
``1 + (L − 1)/E`` on q's gradient when the softmax is flat. The simulation then draws the three as
projections of one Gram matrix (:func:`_token_roots`).

Products of two tensors that are not attention (``matmul``, ``bmm``, two-operand ``einsum``): for
independent factors ``E[(Σ_k a_k b_k)²] = Σ_k E[a_k²]E[b_k²] (1 + (K - 1) c_a c_b)`` with c the
correlation of each factor along the contracted dim (``rho`` when it is the layout's positions,
``xcorr`` when it is the channel). A softmax's output carries its weights' correlation along the
softmax dim, ``(1 - A₂)/((L - 1)A₂)``, so ``softmax(qkᵀ) @ v`` written out gives the same forward as
the fused op.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from initscope.rules import registry
from initscope.rules.base import Context, Rule, bind
from initscope.rules.passthrough import ShapeRule
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE
from initscope.stats.signal import Grad, Layout, Shared, Signal, Spatial, compact, cross_room

# Tokens simulated per call: per-token maps carry ~sqrt(2 / (rows·d)) relative noise.
_TOKENS = 16384
_SEED = 0


def tokens_layout(ndim: int, dim: int) -> Layout:
    """The layout of a tensor whose positions are one dim (``dim``) and whose channel is the last."""
    return Layout(-1, (dim % ndim,))


def _token_map(m2: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Mean of an elementwise map over every dim but ``dim``: one value per token, shape ``(L,)``."""
    m = compact(m2, shape)
    nd = len(shape)
    dim %= nd
    others = tuple(d for d in range(nd) if d != dim)
    t = m.mean(dim=others) if others else m
    return t.reshape(-1).expand(int(shape[dim])).clone()


def _corr(x: Signal | Grad, dim: int) -> float:
    """The correlation between two elements along ``dim`` (0 when the layout does not say)."""
    nd = len(x.shape)
    lay = x.layout
    if lay.spatial is not None and tuple(d % nd for d in lay.spatial) == (dim % nd,):
        return float(x.spatial.rho)
    if isinstance(x, Signal) and lay.channel_dim(nd) == dim % nd and lay.spatial is not None:
        return float(x.shared.xcorr)
    return 0.0


def _clip(r: float) -> float:
    return min(max(float(r), 0.0), 0.999)


def _field(gen: torch.Generator, rows: int, length: int, width: int, m: Tensor, rho: float,
           tokens: Tensor | None = None, width_in: int = 0) -> Tensor:
    """Gaussian ``(rows, length, width)`` with per-token second moment ``m`` and token correlation rho.

    ``tokens``: the square root (``(rows, length, length)`` or ``(rows, length, width_in)``) of the Gram
    matrix of the tokens that the field projects (see :func:`_token_roots`); without it, tokens are
    independent."""
    common = torch.randn(rows, 1, width, generator=gen, dtype=torch.float32)
    if tokens is None:
        own = torch.randn(rows, length, width, generator=gen, dtype=torch.float32)
    else:
        inner = tokens.shape[-1]
        own = tokens @ torch.randn(rows, inner, width, generator=gen, dtype=torch.float32) / math.sqrt(width_in)
    z = math.sqrt(rho) * common + math.sqrt(1.0 - rho) * own
    return z * m.to(torch.float32).clamp(min=0).sqrt().reshape(1, length, 1)


def _token_roots(rows: int, length: int, width_in: int) -> Tensor:
    r"""A square root R of ``Z Zᵀ`` for ``rows`` draws of ``length`` i.i.d. N(0, I) tokens ``Z`` of width
    ``width_in``: ``R ε`` with ``ε`` i.i.d. N(0, 1) is distributed as ``Z W`` with W i.i.d. N(0, 1).

    q, k and v projected from the same tokens by independent weights are, given the tokens, independent
    fields whose covariance over tokens is ``Z Zᵀ / E`` (E = ``width_in``), not the identity: two tokens
    overlap by ``z_i·z_j / E``, of order ``1/√E``. A sum over tokens of products of two of them
    (``∂L/∂q_i = Σ_j ∂L/∂s_ij k_j/√d``, where ``∂L/∂s_ij`` holds ``g·v_j``) collects those overlaps:
    ``E|Σ_j (g·v_j) k_j|² ∝ tr((Z Zᵀ)²) = L E² + L(L − 1)E`` instead of ``L E²``, a factor ``1 + (L − 1)/E``
    (1.33 for 65 tokens of width 192, when the softmax is flat). Drawn as the Bartlett factor of the
    Wishart matrix when ``width_in ≥ length`` (``(rows, L, L)``, its cost free of E), else as Z itself.
    The generator is numpy's, seeded like the rest of the simulation: the plan stays deterministic."""
    rng = np.random.default_rng(_SEED)
    if width_in < length:
        return torch.from_numpy(rng.standard_normal((rows, length, width_in)).astype(np.float32))
    lower = np.tril(rng.standard_normal((rows, length, length)), -1)
    dof = width_in - np.arange(length)
    diag = np.sqrt(rng.chisquare(dof, size=(rows, length)))
    lower[:, np.arange(length), np.arange(length)] = diag
    return torch.from_numpy(lower.astype(np.float32))


@dataclass(frozen=True)
class Simulated:
    """What the simulation measured: per-token maps and token correlations."""

    out: Tensor
    out_rho: float
    gq: Tensor | None = None
    gk: Tensor | None = None
    gv: Tensor | None = None
    gq_rho: float = 0.0
    gk_rho: float = 0.0
    gv_rho: float = 0.0


def _token_pairs(t: Tensor) -> float:
    """``Σ_{i≠j} E[t_i t_j]`` per element of the width for ``(rows, L, width)``: what the cross terms of
    ``E|Σ_i t_i|²`` add to the diagonal."""
    return float((t.sum(1) ** 2).mean(dim=0).sum()) / t.shape[-1] - float((t**2).mean(dim=(0, 2)).sum())


def _rho_of(pairs: float, m: Tensor) -> float:
    """The token correlation as the pass reads one (``_equicorrelated``: tokens i and j co-vary by
    ``rho·√(m_i m_j)``), chosen so that the cross terms add up to ``pairs``: ``rho·((Σ_i √m_i)² − Σ_i m_i)``.
    With a class token's gradient 100× the others' this differs from the plain mean correlation
    ``pairs / ((L − 1) Σ_i m_i)`` by the factor ``(L − 1) Σ m / ((Σ √m)² − Σ m)``, 4 on the ViT's blocks."""
    room = cross_room(m)
    return pairs / room if room > 0 else 0.0


def _token_corr(t: Tensor) -> float:
    """The token correlation (:func:`_rho_of`) of ``(rows, L, width)``."""
    if t.shape[1] < 2:
        return 0.0
    return _rho_of(_token_pairs(t), (t**2).mean(dim=(0, 2)))


def _key(t: Tensor | None) -> tuple | None:
    if t is None:
        return None
    return tuple(round(float(v), 10) for v in t.reshape(-1))


@lru_cache(maxsize=256)
def _simulate_cached(mq, mk, mv, rq, rk, rv, g, rg, d, dv, scale, mask_key, causal, width_in):
    mask = _MASKS.get(mask_key)
    lq, lk = len(mq), len(mk)
    rows = max(8, min(512, _TOKENS // max(lq, 1)))
    gen = torch.Generator().manual_seed(_SEED)
    mqt, mkt, mvt = (torch.tensor(v, dtype=torch.float64) for v in (mq, mk, mv))
    gt = None if g is None else torch.tensor(g, dtype=torch.float64)
    # q, k and v of self-attention project the same tokens: one Gram matrix per draw for the three.
    roots = _token_roots(rows, lq, width_in) if width_in and lq == lk else None
    # The additive mask of each row (a bank of masks, as Swin's windows, taken in turn), and causality.
    bank = None
    if mask is not None:
        masks = mask.reshape(-1, lq, lk).to(torch.float32)
        bank = masks[torch.arange(rows) % masks.shape[0]]
    if causal:
        blocked = torch.ones(lq, lk, dtype=torch.bool).triu(1 + lk - lq)
        bank = (torch.zeros(rows, lq, lk) if bank is None else bank).masked_fill(blocked, float("-inf"))
    special = _special_queries(mq, g)
    with torch.enable_grad():
        q = _field(gen, rows, lq, d, mqt, rq, roots, width_in).requires_grad_(True)
        k = _field(gen, rows, lk, d, mkt, rk, roots, width_in).requires_grad_(True)
        v = _field(gen, rows, lk, dv, mvt, rv, roots, width_in).requires_grad_(True)
        s = q @ k.transpose(-2, -1) * scale
        if bank is not None:
            s = s + bank
        o = torch.softmax(s, dim=-1) @ v
        out = (o.detach().double() ** 2).mean(dim=(0, 2))
        out_rho = _token_corr(o.detach().double())
        if gt is not None:
            # The special queries' gradients are left to their own samples below.
            bulk = gt.clone()
            bulk[list(special)] = 0.0
            # Drawn on their own, the special queries share nothing with the rest: the cross terms that
            # rg gives all tokens (rg·room(g), _rho_of) are the bulk's alone, a larger correlation.
            if special and rg > 0:
                room = cross_room(bulk)
                rg = _clip(rg * cross_room(gt) / room) if room > 0 else 0.0
            go = _field(gen, rows, lq, dv, bulk, rg)
            gq, gk, gv = torch.autograd.grad(o, (q, k, v), go)
    if gt is None:
        gq = gk = gv = None
    maps = [None if t is None else (t.double() ** 2).mean(dim=(0, 2)) for t in (gq, gk, gv)]
    pairs = [0.0, 0.0, 0.0] if gt is None or lk < 2 else [_token_pairs(t.double()) for t in (gq, gk, gv)]
    if special:
        norms = _token_norms(roots, width_in, lq)
        for i in special:
            before = maps
            maps = _one_query(gen, i, mqt[i], rq, None if gt is None else gt[i], norms[:, i], k.detach(), v.detach(),
                              scale, None if bank is None else bank[:, i], out, maps)
            if gt is not None:
                # What query i sends the keys sums to zero over them (Σ_j ∂L/∂s_ij = 0), and what it sends
                # the values sums to its own gradient (Σ_j a_ij = 1); it is independent of the other
                # queries, so those are its only cross terms. Without this a gradient that arrives at the
                # class token alone (the last block of a ViT) left k's and v's token correlation at 0.
                gk_i, gv_i = float((maps[1] - before[1]).sum()), float((maps[2] - before[2]).sum())
                pairs[1] -= gk_i
                pairs[2] += float(gt[i]) - gv_i
    if gt is None:
        return Simulated(out, out_rho)
    rhos = [_rho_of(pr, m) if lk > 1 else 0.0 for pr, m in zip(pairs, maps)]
    return Simulated(out, out_rho, *maps, *rhos)


# Fresh samples of a special query per simulated row (see _one_query).
_SAMPLES = 64


def _special_queries(mq: tuple, g: tuple | None) -> list[int]:
    """Query tokens far from the bulk (a class token): a gradient over 4x the median token's, or a second
    moment off the median's by 2x; at most an eighth of the tokens."""
    mid_q = float(np.median(mq))
    odd = {i for i, m in enumerate(mq) if not 0.5 * mid_q <= m <= 2.0 * mid_q}
    if g is not None:
        mid_g = float(np.median(g))
        odd |= {i for i, x in enumerate(g) if x > 4.0 * mid_g and x > 0}
    return sorted(odd) if len(odd) <= max(1, len(mq) // 8) else []


def _token_norms(roots: Tensor | None, width_in: int, length: int) -> Tensor:
    """Each simulated token's squared length over its mean, ``(rows, L)`` (ones for independent fields)."""
    if roots is None:
        return torch.ones(1, length)
    return (roots.double() ** 2).sum(-1) / width_in


def _one_query(gen: torch.Generator, i: int, mq: Tensor, rq: float, g: Tensor | None, norm: Tensor, k: Tensor,
               v: Tensor, scale: float, bias: Tensor | None, out: Tensor, maps: list) -> list:
    r"""Query token i's statistics from ``_SAMPLES`` fresh draws of it per row against the row's keys.

    A token whose maps differ from the others' is one sample per row of the full simulation, and what
    it alone receives is rare events: under a one-hot softmax a key's gradient from one query is
    ``a_ij (g_i·v_j − ...) q_i``, nonzero on the few rows where that query nearly ties two keys. Given
    the row's tokens q_i is independent of the keys and values (independent weights), Gaussian with
    the token's length (``norm``), so it is drawn afresh many times against the same keys and values:
    its output, its gradient, and what it sends each key and value (``∂L/∂s_ij q_i`` and ``a_ij g_i``,
    summed in square with what the other queries send: independent queries, uncorrelated terms) are
    computed explicitly. ``out`` is updated in place; returns the gradient maps."""
    rows, _, d = k.shape
    q = torch.randn(rows, _SAMPLES, d, generator=gen, dtype=torch.float64)
    common = torch.randn(rows, _SAMPLES, d, generator=gen, dtype=torch.float64)
    q = (math.sqrt(rq) * common + math.sqrt(1 - rq) * norm.reshape(-1, 1, 1).sqrt() * q) * float(mq) ** 0.5
    k, v = k.double(), v.double()
    logits = torch.einsum("rmd,rld->rml", q, k) * scale
    if bias is not None:
        logits = logits + bias.double().reshape(rows, 1, -1)
    a = torch.softmax(logits, dim=-1)
    o = a @ v
    out[i] = float((o**2).mean())
    if g is None:
        return maps
    dv = v.shape[-1]
    go = torch.randn(rows, _SAMPLES, dv, generator=gen, dtype=torch.float64) * float(g) ** 0.5
    u = torch.einsum("rmd,rld->rml", go, v)
    ds = a * (u - (a * u).sum(-1, keepdim=True))
    gq = torch.einsum("rml,rld->rmd", ds, k) * scale
    gq_map, gk_map, gv_map = (m.clone() for m in maps)
    gq_map[i] = float((gq**2).mean())
    gk_map += (ds**2 * (q**2).sum(-1, keepdim=True)).mean(dim=(0, 1)) * scale**2 / d
    gv_map += (a**2 * (go**2).sum(-1, keepdim=True)).mean(dim=(0, 1)) / dv
    return [gq_map, gk_map, gv_map]


_MASKS: dict = {}


def simulate(mq: Tensor, mk: Tensor, mv: Tensor, rq: float, rk: float, rv: float, d: int, dv: int, scale: float,
             g: Tensor | None = None, rg: float = 0.0, mask: Tensor | None = None, causal: bool = False,
             width_in: int | None = None) -> Simulated:
    """Attention at the Gaussian model (see the module): per-token maps in, per-token maps out.

    ``width_in``: q, k and v are projections of the same tokens of this width (self-attention through
    one Linear, :func:`shared_tokens`); None: independent fields."""
    mask_key = None
    if mask is not None:
        mask_key = ("mask", tuple(mask.shape), hash(mask.to(torch.float64).numpy().tobytes()))
        _MASKS[mask_key] = mask
    # Token-uniform inputs give token-uniform outputs: simulate with uniform maps and average.
    return _simulate_cached(_key(mq), _key(mk), _key(mv), round(_clip(rq), 6), round(_clip(rk), 6),
                            round(_clip(rv), 6), _key(g), round(_clip(rg), 6), int(d), int(dv),
                            float(scale), mask_key, bool(causal), int(width_in or 0))


def _uniform_if(t: Tensor, uniform: bool) -> Tensor:
    return torch.full_like(t, float(t.mean())) if uniform else t


def _is_uniform(*maps: Tensor | None) -> bool:
    for m in maps:
        if m is not None and m.numel() > 1 and float(m.max() - m.min()) > 1e-9 * max(float(m.abs().max()), 1e-300):
            return False
    return True


def _mask_value(mask) -> Tensor | None:
    """An attention mask as an additive float tensor (None: no mask)."""
    if mask is None:
        return None
    value = mask.const if isinstance(mask, Signal) else mask
    if value is None:
        # A mask computed from the input: not modelled (its second moment is no mask).
        return None
    value = torch.as_tensor(value)
    if value.dtype == torch.bool:
        return torch.zeros(value.shape, dtype=torch.float64).masked_fill(~value, float("-inf"))
    return value.to(torch.float64)


@dataclass(frozen=True)
class AttentionCall:
    """What the attention's forward leaves its backward."""

    q: Signal
    k: Signal
    v: Signal
    d: int
    dv: int
    scale: float
    mask: Tensor | None
    causal: bool
    width_in: int | None = None


def attention_forward(ctx: Context, q: Signal, k: Signal, v: Signal, scale: float | None = None,
                      mask=None, causal: bool = False, width_in: int | None = None) -> Signal:
    """The Signal of ``softmax(q kᵀ · scale + mask) v`` (tokens at dim -2 of each); ``width_in`` as in
    :func:`simulate`."""
    d, dv = int(q.shape[-1]), int(v.shape[-1])
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mq, mk, mv = (_token_map(s.m2, s.shape, -2) for s in (q, k, v))
    m = _mask_value(mask)
    uniform = _is_uniform(mq, mk, mv) and m is None
    sim = simulate(mq, mk, mv, _corr(q, -2), _corr(k, -2), _corr(v, -2), d, dv, scale, mask=m, causal=causal,
                   width_in=width_in)
    ctx.put(AttentionCall(q, k, v, d, dv, scale, m, causal, width_in))
    shape = torch.Size((*torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]), int(q.shape[-2]), dv))
    nd = len(shape)
    out = _uniform_if(sim.out, uniform).reshape((1,) * (nd - 2) + (-1, 1))
    return Signal(shape, out.to(DTYPE), tokens_layout(nd, -2), Spatial(rho=sim.out_rho), Shared(v.shared.xcorr))


def attention_backward(ctx: Context, grad: Grad) -> dict:
    call = ctx.get(AttentionCall)
    q, k, v = call.q, call.k, call.v
    g = _token_map(grad.total(), grad.shape, -2)
    mq, mk, mv = (_token_map(s.m2, s.shape, -2) for s in (q, k, v))
    uniform = _is_uniform(mq, mk, mv, g) and call.mask is None
    sim = simulate(mq, mk, mv, _corr(q, -2), _corr(k, -2), _corr(v, -2), call.d, call.dv, call.scale,
                   g=g, rg=_corr(grad, -2), mask=call.mask, causal=call.causal, width_in=call.width_in)
    out: dict = {}
    for sig, gm, rho in ((q, sim.gq, sim.gq_rho), (k, sim.gk, sim.gk_rho), (v, sim.gv, sim.gv_rho)):
        if sig.const is not None:
            continue
        nd = len(sig.shape)
        m = _uniform_if(gm, uniform).reshape((1,) * (nd - 2) + (-1, 1)).to(DTYPE)
        # Heads broadcast over a shared k or v (grouped-query attention): summed back.
        reps = math.prod(grad.shape[:-2]) / max(math.prod(sig.shape[:-2]), 1)
        part = Grad(sig.shape, m * reps, tokens_layout(nd, -2), Spatial(rho=rho))
        out[sig] = out[sig] + part if sig in out else part
    return out


def _projected_by(node) -> fx.Node | None:
    """The Linear node whose output ``node`` is, through shape ops and identities only (heads split off,
    q/k/v unbound or chunked, transposed); None when something else stands between."""
    while isinstance(node, fx.Node):
        if "initscope_linear_in" in node.meta:
            return node
        rule = (registry.method_rule(node.target) if node.op == "call_method"
                else registry.function_rule(node.target) if node.op == "call_function" else None)
        shape_op = isinstance(rule, ShapeRule) or "initscope_identity" in node.meta
        if not shape_op or not node.args:
            return None
        node = node.args[0]
    return None


def shared_tokens(*nodes) -> int | None:
    """The width of the tokens that q, k and v (graph nodes) all project, when one Linear or Linears
    reading one tensor made them all (self-attention); None otherwise (cross-attention, anything else)."""
    linears = [_projected_by(n) for n in nodes]
    if any(lin is None for lin in linears):
        return None
    sources = {lin.args[0] if lin.args else lin.kwargs.get("input") for lin in linears}
    widths = {lin.meta["initscope_linear_in"] for lin in linears}
    if len(sources) != 1 or len(widths) != 1:
        return None
    return int(widths.pop())


@register_rule(F.scaled_dot_product_attention)
class ScaledDotProductAttention(Rule):
    """``F.scaled_dot_product_attention``: forward ``E[v²](ρ_v + (1 - ρ_v) A₂)`` per token; backward
    through the simulated softmax (module docstring). Dropout inside it is taken as eval (p ignored
    when the node runs in eval mode, as an initialization is planned)."""

    def forward(self, ctx: Context, *args, **kwargs) -> Signal:
        p = bind(args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
                  {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None})
        nodes = bind(ctx.node.args, ctx.node.kwargs, ("query", "key", "value"), {})
        width_in = shared_tokens(nodes["query"], nodes["key"], nodes["value"])
        return attention_forward(ctx, p["query"], p["key"], p["value"], p["scale"], p["attn_mask"],
                                 bool(p["is_causal"]), width_in)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        return attention_backward(ctx, grad)


# -- the softmax alone -----------------------------------------------------------------------------
@lru_cache(maxsize=512)
def softmax_stats(length: int, var: float, rho_g: float) -> tuple[float, float, float]:
    """For a softmax over ``length`` Gaussian logits of variance ``var`` (what a row does not share):
    ``A₂ = E[Σ_j a_j²]``, the correlation of two weights of a row, and ``E[(∂L/∂s_j)²] / E[(∂L/∂a_j)²]``
    for a gradient at the weights with correlation ``rho_g`` along the row. Fixed-seed simulation."""
    rows = max(64, min(4096, _TOKENS * 4 // max(length, 1)))
    gen = torch.Generator().manual_seed(_SEED)
    with torch.enable_grad():
        s = (torch.randn(rows, length, generator=gen, dtype=torch.float64) * math.sqrt(max(var, 0.0))).requires_grad_(True)
        a = torch.softmax(s, dim=-1)
        rg = _clip(rho_g)
        ga = math.sqrt(rg) * torch.randn(rows, 1, generator=gen, dtype=torch.float64) \
            + math.sqrt(1 - rg) * torch.randn(rows, length, generator=gen, dtype=torch.float64)
        (gs,) = torch.autograd.grad(a, s, ga)
    a = a.detach()
    a2 = float((a**2).sum(-1).mean())
    corr = (1.0 - a2) / ((length - 1) * a2) if length > 1 and a2 > 0 else 0.0
    back = float((gs**2).mean() / (ga**2).mean())
    return a2, corr, back


class SoftmaxRule(Rule):
    """``softmax(x, dim)``: weights of second moment ``A₂/L`` that sum to one along ``dim``."""

    def _dim(self, ctx: Context, x: Signal, args, kwargs) -> int:
        p = bind(args, kwargs, ("dim",), {"dim": None})
        if p["dim"] is None:
            if ctx.module is not None and getattr(ctx.module, "dim", None) is not None:
                return int(ctx.module.dim) % len(x.shape)
            return len(x.shape) - 1
        return int(p["dim"]) % len(x.shape)

    def forward(self, ctx: Context, x: Signal, *args, **kwargs) -> Signal:
        dim = self._dim(ctx, x, args, kwargs)
        length = int(x.shape[dim])
        var = x.mean_m2 * (1.0 - _clip(_corr(x, dim)))
        a2, corr, _ = softmax_stats(length, round(var, 8), 0.0)
        nd = len(x.shape)
        out = Signal(x.shape, torch.full((1,) * nd, a2 / length, dtype=DTYPE), Layout(-1, (dim,)) if dim != nd - 1
                     else Layout(0, (dim,)), Spatial(rho=corr), Shared(min(1.0, 1.0 / (length * a2))))
        return out

    def backward(self, ctx: Context, grad: Grad) -> dict:
        x = ctx.args[0]
        dim = self._dim(ctx, x, ctx.args[1:], ctx.kwargs)
        length = int(x.shape[dim])
        var = x.mean_m2 * (1.0 - _clip(_corr(x, dim)))
        _, _, back = softmax_stats(length, round(var, 8), round(_clip(_corr(grad, dim)), 6))
        return {x: Grad(x.shape, grad.total() * back, x.layout, Spatial(rho=0.0))}


register_rule(F.softmax, torch.softmax, "softmax", nn.Softmax)(SoftmaxRule)


# -- products of two tensors -----------------------------------------------------------------------
def _product_corr(x: Signal | Grad, dim: int) -> float:
    return _clip(_corr(x, dim))


def _einsum_maps(equation: str, a: Tensor, b: Tensor) -> Tensor:
    return torch.einsum(equation, a, b)


@dataclass(frozen=True)
class Product:
    """An einsum equation for the two factors (matmul in einsum form) and the contracted letters."""

    equation: str
    contracted: str


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _matmul_equation(na: int, nb: int) -> str:
    """``a @ b`` as an einsum over broadcast batch dims (both at least 2-d)."""
    nbatch = max(na, nb) - 2
    batch = _LETTERS[:nbatch]
    m, k, n = "x", "y", "z"
    ea = batch[nbatch - (na - 2):] + m + k
    eb = batch[nbatch - (nb - 2):] + k + n
    return f"{ea},{eb}->{batch}{m}{n}"


def _parse(equation: str) -> tuple[str, str, str]:
    eq = equation.replace(" ", "")
    ins, out = eq.split("->")
    a, b = ins.split(",")
    return a, b, out


def _compact_for(x: Signal | Grad, spec: str) -> Tensor:
    m = compact(x.total() if isinstance(x, Grad) else x.m2, x.shape)
    return m.expand(x.shape) if len(spec) == len(x.shape) else m


def _factor(x: Signal | Grad, spec: str, letter: str) -> float:
    return _product_corr(x, spec.index(letter))


def product_forward(ctx: Context, equation: str, a: Signal, b: Signal) -> Signal:
    ea, eb, eo = _parse(equation)
    contracted = "".join(c for c in ea if c in eb and c not in eo)
    ma, mb = compact(a.m2, a.shape), compact(b.m2, b.shape)
    m2 = torch.einsum(equation, ma.expand(a.shape), mb.expand(b.shape))
    corr = 1.0
    for c in contracted:
        size = int(a.shape[ea.index(c)])
        corr *= 1.0 + (size - 1) * _factor(a, ea, c) * _factor(b, eb, c)
    out_shape = torch.Size(m2.shape)
    nd = len(out_shape)
    # The output's positions: b's along its last letter when that is kept, else a's along its first
    # free letter (q kᵀ: the keys; a v: the queries).
    layout, rho = Layout(), 0.0
    if nd >= 2:
        last = eo[-1]
        if last in eb and _factor(b, eb, last) > 0:
            layout, rho = Layout(0, (nd - 1,)), _factor(b, eb, last)
        elif eo[-2] in ea:
            layout, rho = tokens_layout(nd, -2), _factor(a, ea, eo[-2])
    ctx.put(Product(equation, contracted))
    xcorr = a.shared.xcorr * b.shared.xcorr
    from initscope.stats.signal import shrink

    return Signal(out_shape, shrink(m2 * corr).to(DTYPE), layout, Spatial(rho=rho), Shared(min(xcorr, 1.0)))


def product_backward(ctx: Context, grad: Grad, a: Signal, b: Signal) -> dict:
    held = ctx.get(Product)
    ea, eb, eo = _parse(held.equation)
    g = grad.total()
    gm = compact(g, grad.shape).expand(grad.shape)
    out = {}
    from initscope.stats.signal import shrink

    for x, ex, other, eother in ((a, ea, b, eb), (b, eb, a, ea)):
        if x.const is not None:
            continue
        mo = compact(other.m2, other.shape).expand(other.shape)
        m = torch.einsum(f"{eo},{eother}->{ex}", gm, mo)
        summed = "".join(c for c in eo + eother if c not in ex)
        corr = 1.0
        for c in dict.fromkeys(summed):
            if c in eo and c in eother:
                size = int(grad.shape[eo.index(c)])
                corr *= 1.0 + (size - 1) * _product_corr(grad, eo.index(c)) * _factor(other, eother, c)
        # A factor broadcast along a dim of the output is summed there, not contracted.
        m = m * corr
        while m.ndim > len(x.shape):
            m = m.sum(0)
        out[x] = Grad(x.shape, shrink(m).to(DTYPE), x.layout, Spatial())
    return out


class MatmulRule(Rule):
    """``a @ b`` (``matmul``, ``bmm``) of two independent tensors; a tensor times a constant matrix
    is the same formula with the constant's squares."""

    def forward(self, ctx: Context, a, b, *args, **kwargs) -> Signal:
        a, b = _as_signal(a), _as_signal(b)
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise ValueError(f"matmul of a {len(a.shape)}-d and a {len(b.shape)}-d tensor at {ctx.where!r} is not modelled")
        return product_forward(ctx, _matmul_equation(len(a.shape), len(b.shape)), a, b)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        return product_backward(ctx, grad, _as_signal(ctx.args[0]), _as_signal(ctx.args[1]))


def _as_signal(v) -> Signal:
    if isinstance(v, Signal):
        return v
    return Signal.constant(torch.as_tensor(v))


register_rule(torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm")(MatmulRule)


@register_rule(torch.einsum)
class EinsumRule(Rule):
    """Two-operand ``einsum``: the product formula over its contracted letters."""

    def _operands(self, args):
        equation, *ops = args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if len(ops) != 2:
            raise ValueError(f"einsum with {len(ops)} operands is not modelled (two are)")
        return equation, ops[0], ops[1]

    def forward(self, ctx: Context, *args, **kwargs) -> Signal:
        equation, a, b = self._operands(args)
        if "..." in equation:
            raise ValueError(f"einsum {equation!r} with an ellipsis is not modelled")
        return product_forward(ctx, equation.replace(" ", ""), _as_signal(a), _as_signal(b))

    def backward(self, ctx: Context, grad: Grad) -> dict:
        _, a, b = self._operands(ctx.args)
        return product_backward(ctx, grad, _as_signal(a), _as_signal(b))
