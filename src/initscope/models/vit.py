"""A small Vision Transformer (pre-norm, class token, learned position embeddings), timm's layout.

``vit_tiny_like()`` is ViT-Tiny's shape at a small input: 12 blocks of width 192 with 3 heads, 8×8
patches of a 3×64×64 image (64 patches and the class token). Each block is
``x + attn(LN(x))`` then ``x + mlp(LN(x))``; the attention is timm's (one ``qkv`` Linear,
``F.scaled_dot_product_attention``, ``proj``). It is the model on which initscope's predictions are
held against measurement for attention (tests/test_attention.py, docs/theory.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, residual_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 64, patch: int = 8, in_channels: int = 3, dim: int = 192, depth: int = 12,
                 heads: int = 3, num_classes: int = 10, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny_like(**kwargs) -> VisionTransformer:
    """ViT-Tiny's blocks (12 × width 192, 3 heads, MLP 768) on 8×8 patches of a 3×64×64 input."""
    return VisionTransformer(**kwargs)
