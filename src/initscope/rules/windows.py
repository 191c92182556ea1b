r"""Swin's shifted-window attention, traced as ops with one weight each.

torchvision's ``ShiftedWindowAttention`` calls one function (``shifted_window_attention``, a leaf of
the trace) with both its ``qkv`` and its ``proj`` weights; a weight layer is one weight. The tracer
(:mod:`initscope.graph.trace`) writes the module out as

``swin_windows`` (pad, cyclic shift, partition into windows of N tokens) → ``qkv`` (Linear) →
``swin_window_attention`` (the heads' attention inside each window, with the relative position
bias and the shift mask) → ``proj`` (Linear) → ``swin_merge`` (windows back, shift undone, crop).

The two rearrangements are shape ops (their rule runs them on second-moment maps; zero padding adds
nothing). The attention is :func:`initscope.rules.attention.attention_forward` with an additive mask
bank: the bias of each head plus, in shifted blocks, −100 between tokens that came from different
regions, so that a window's tokens attend only within their region (a smaller L for the softmax).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from initscope.rules.attention import (AttentionCall, _token_map, attention_backward, attention_forward, shared_tokens,
                                       tokens_layout)
from initscope.rules.base import Context, Rule
from initscope.rules.passthrough import ShapeRule
from initscope.rules.registry import register_rule
from initscope.stats.dist import DTYPE
from initscope.stats.signal import Grad, Shared, Signal, Spatial


def _shift(window: list, shift: list, pad_h: int, pad_w: int) -> list:
    shift = list(shift)
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    return shift


def swin_windows(x: torch.Tensor, window: list, shift: list) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B·nW, N, C)``: padded to whole windows, cyclically shifted, partitioned."""
    b, h, w, c = x.shape
    pad_r, pad_b = (window[1] - w % window[1]) % window[1], (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    s = _shift(window, shift, ph, pw)
    if sum(s) > 0:
        x = torch.roll(x, shifts=(-s[0], -s[1]), dims=(1, 2))
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def swin_merge(o: torch.Tensor, x: torch.Tensor, window: list, shift: list) -> torch.Tensor:
    """The inverse of :func:`swin_windows` for windows ``o``, to the shape of ``x``."""
    b, h, w, c = x.shape
    ph, pw = h + (window[0] - h % window[0]) % window[0], w + (window[1] - w % window[1]) % window[1]
    o = o.view(b, ph // window[0], pw // window[1], window[0], window[1], c)
    o = o.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    s = _shift(window, shift, ph, pw)
    if sum(s) > 0:
        o = torch.roll(o, shifts=(s[0], s[1]), dims=(1, 2))
    return o[:, :h, :w, :].contiguous()


def shift_mask(window: list, shift: list, ph: int, pw: int) -> torch.Tensor | None:
    """torchvision's mask, ``(nW, N, N)``: −100 between tokens of different regions (None: no shift)."""
    s = _shift(window, shift, ph, pw)
    if sum(s) == 0:
        return None
    mask = torch.zeros((ph, pw), dtype=DTYPE)
    hs = ((0, -window[0]), (-window[0], -s[0]), (-s[0], None))
    ws = ((0, -window[1]), (-window[1], -s[1]), (-s[1], None))
    count = 0
    for a in hs:
        for b in ws:
            mask[a[0]:a[1], b[0]:b[1]] = count
            count += 1
    mask = mask.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


def swin_window_attention(qkv: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, heads: int, window: list,
                          shift: list) -> torch.Tensor:
    """The attention of each window: ``qkv`` ``(B·nW, N, 3C)`` → ``(B·nW, N, C)``."""
    n, tokens, c3 = qkv.shape
    q, k, v = qkv.reshape(n, tokens, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    _, h, w, _ = x.shape
    ph, pw = h + (window[0] - h % window[0]) % window[0], w + (window[1] - w % window[1]) % window[1]
    mask = bias.unsqueeze(0)
    extra = shift_mask(window, shift, ph, pw)
    if extra is not None:
        nw = extra.shape[0]
        mask = (mask + extra.unsqueeze(1).to(bias.dtype)).repeat(n // nw, 1, 1, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(n, tokens, c3 // 3)


torch.fx.wrap("swin_windows")
torch.fx.wrap("swin_merge")
torch.fx.wrap("swin_window_attention")


def swin_attention(m, x):
    """torchvision's ``ShiftedWindowAttention`` (v1) written out (module docstring)."""
    bias = m.get_relative_position_bias()[0]
    windows = swin_windows(x, m.window_size, m.shift_size)
    o = swin_window_attention(m.qkv(windows), x, bias, m.num_heads, m.window_size, m.shift_size)
    return swin_merge(m.proj(o), x, m.window_size, m.shift_size)


register_rule(swin_windows, swin_merge)(ShapeRule)


@register_rule(swin_window_attention)
class SwinWindowAttention(Rule):
    def _split(self, qkv: Signal, heads: int) -> tuple[Signal, torch.Size]:
        n, tokens, c3 = (int(s) for s in qkv.shape)
        shape = torch.Size((n, heads, tokens, c3 // (3 * heads)))
        m = _token_map(qkv.m2, qkv.shape, 1).reshape(1, 1, tokens, 1)
        return Signal(shape, m.to(DTYPE), tokens_layout(4, -2), Spatial(rho=qkv.spatial.rho),
                      Shared(qkv.shared.xcorr)), shape

    def forward(self, ctx: Context, qkv: Signal, x: Signal, bias, heads: int, window: list, shift: list) -> Signal:
        q, _ = self._split(qkv, heads)
        h, w = int(x.shape[1]), int(x.shape[2])
        ph, pw = h + (window[0] - h % window[0]) % window[0], w + (window[1] - w % window[1]) % window[1]
        b = bias.const if isinstance(bias, Signal) else bias
        mask = None if b is None else torch.as_tensor(b, dtype=DTYPE)
        extra = shift_mask(window, shift, ph, pw)
        if extra is not None:
            mask = (mask if mask is not None else torch.zeros(1, dtype=DTYPE)).unsqueeze(0) + extra.unsqueeze(1)
        out = attention_forward(ctx, q, q, q, None, mask, width_in=shared_tokens(ctx.node.args[0]))
        n, tokens, c3 = (int(s) for s in qkv.shape)
        m = _token_map(out.m2, out.shape, -2).reshape(1, tokens, 1)
        return Signal(torch.Size((n, tokens, c3 // 3)), m, tokens_layout(3, 1), Spatial(rho=out.spatial.rho),
                      out.shared)

    def backward(self, ctx: Context, grad: Grad) -> dict:
        qkv, heads = ctx.args[0], ctx.args[3]
        call = ctx.get(AttentionCall)
        n, tokens, c = (int(s) for s in grad.shape)
        g = _token_map(grad.total(), grad.shape, 1).reshape(1, 1, tokens, 1)
        g4 = Grad(call.q.shape, g.to(DTYPE), tokens_layout(4, -2), Spatial(rho=grad.spatial.rho))
        # q, k and v are one Signal here: the attention's backward sums their three gradients, and a
        # third of that is each of the 3C channels' share.
        parts = attention_backward(ctx, g4)
        total = parts[call.q]
        m = _token_map(total.total(), total.shape, -2).reshape(1, tokens, 1) / 3.0
        return {qkv: Grad(qkv.shape, m, tokens_layout(3, 1), Spatial(rho=total.spatial.rho))}
