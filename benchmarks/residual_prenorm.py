"""Pre-norm transformer blocks at depth 12, 48, 192: where each residual scheme keeps the signal and
the gradient (docs/theory.md, "Residual policy for pre-norm transformers").

Measured on :class:`Stack`: a patch embedding (8×8 patches of a 3×32×32 input, 16 tokens of width
64) with position embeddings, L pre-norm blocks of ``initscope.models.vit`` (2 heads, MLP 256), a final
LayerNorm and a Linear head on the tokens' mean (no class token: its tiny stream, ``pos_embed`` alone,
would make the gradient the LayerNorm sends it, not the residual scheme, the largest number). i.i.d.
N(0, 1) inputs, batch 16, ``--draws`` weight draws (mean of the log2 values):

* signal: the residual stream's second moment after the last block over that after the patch
  embedding (the stream the first block reads);
* gradient: the gradient's second moment at the first block's input over that at the last block's
  output, for a loss ``Σ logits · ξ`` with ξ i.i.d. N(0, 1);
* out: the stream's second moment after the last block (what the final LayerNorm divides by).

Each published scheme is applied as its paper writes it for the weights (biases zero, LayerNorms
γ = 1, β = 0, the patch embedding and position embedding as the model builds them):

* ``default-0.02``: every Linear N(0, 0.02²) (GPT-2, timm's ViT).
* ``nanogpt``: the same, and the two output projections of each block (``attn.proj``, ``fc2``)
  N(0, (0.02/√(2L))²).
* ``tfixup``: Xavier uniform, and v, the out-projection and the MLP scaled by 0.67 L^(-1/4)
  (T-Fixup's encoder rule; T-Fixup removes the LayerNorms, which this pre-norm model keeps).
* ``deepnorm``: Xavier normal, with gain β = (8L)^(-1/4) on v, the out-projection and the MLP
  (DeepNet's encoder rule; its α on the shortcut belongs to post-LN blocks and is not applied).
* ``umup``: unit-scaled weights (std 1/√fan_in) and each branch's output projection scaled by
  τ = 1/√(2L), u-μP's depth rule for the residual branch written into the init (u-μP puts τ in the
  residual add; with a LayerNorm in front of every branch and at the end only the ratios count).
* ``initscope:<method>:<policy>``: ``initscope.init_`` with that residual policy (``scale``: the
  stream grows by ``residual_growth`` = 2 over all branches).

Run: ``python benchmarks/residual_prenorm.py [--draws 3] 12 48 192`` (one thread).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import initscope
from initscope.models.vit import Block

SCHEMES = ["default-0.02", "nanogpt", "tfixup", "deepnorm", "umup", "initscope:kaiming-forward:none",
           "initscope:kaiming-forward:scale", "initscope:asv-forward-exact:scale", "initscope:asv-backward:scale"]
BATCH = 16


class Stack(nn.Module):
    """Pre-norm transformer blocks between a patch embedding and a mean-pooled head."""

    def __init__(self, depth: int, dim: int = 64, heads: int = 2, patch: int = 8, image: int = 32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 10)

    def embed(self, x):
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def read(self, h):
        return self.head(self.norm(h).mean(1))

    def forward(self, x):
        return self.read(self.blocks(self.embed(x)))


def _v_rows(block) -> slice:
    n = block.attn.qkv.out_features // 3
    return slice(2 * n, 3 * n)


@torch.no_grad()
def apply_scheme(model: Stack, name: str, depth: int, gen: torch.Generator) -> None:
    if name.startswith("initscope:"):
        _, method, policy = name.split(":")
        initscope.init_(model, method, input_shape=(3, 32, 32), residual=policy, generator=gen)
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        nn.init.zeros_(m.bias)
    if name in ("default-0.02", "nanogpt"):
        for m in linears:
            nn.init.normal_(m.weight, std=0.02, generator=gen)
        if name == "nanogpt":
            for b in model.blocks:
                for m in (b.attn.proj, b.fc2):
                    m.weight.mul_(1 / math.sqrt(2 * depth))
    elif name in ("tfixup", "deepnorm"):
        # Both scale v, the out-projection and the MLP of every block on top of Xavier.
        xavier, factor = ((nn.init.xavier_uniform_, 0.67 * depth**-0.25) if name == "tfixup"
                          else (nn.init.xavier_normal_, (8 * depth) ** -0.25))
        for m in linears:
            xavier(m.weight, generator=gen)
        for b in model.blocks:
            b.attn.qkv.weight[_v_rows(b)].mul_(factor)
            for m in (b.attn.proj, b.fc1, b.fc2):
                m.weight.mul_(factor)
    elif name == "umup":
        for m in linears:
            nn.init.normal_(m.weight, std=m.in_features**-0.5, generator=gen)
        for b in model.blocks:
            for m in (b.attn.proj, b.fc2):
                m.weight.mul_(1 / math.sqrt(2 * depth))
    else:
        raise ValueError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")


def measure(depth: int, name: str, draws: int) -> tuple[float, float, float]:
    """Mean over draws of log2 signal growth, log2 gradient growth and log2 E[x²] after the last block."""
    torch.manual_seed(0)
    model = Stack(depth)
    sig, grad, out = [], [], []
    for d in range(draws):
        gen = torch.Generator().manual_seed(d)
        apply_scheme(model, name, depth, gen)
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        h0 = model.embed(x)
        h0.retain_grad()
        h = model.blocks(h0)
        h.retain_grad()
        logits = model.read(h)
        logits.backward(torch.randn(logits.shape, generator=gen))
        m0, m, g0, g = (float((t.detach() ** 2).mean()) for t in (h0, h, h0.grad, h.grad))
        sig.append(math.log2(m / m0))
        grad.append(math.log2(g0 / g))
        out.append(math.log2(m))
        model.zero_grad(set_to_none=True)
    return sum(sig) / draws, sum(grad) / draws, sum(out) / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("depths", nargs="*", type=int, default=[12, 48, 192])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| scheme | " + " | ".join(f"L={d}: signal, gradient, out (bits)" for d in args.depths) + " |")
    print("|---|" + "---|" * len(args.depths))
    for s in args.schemes.split(","):
        cells = []
        for d in args.depths:
            a, b, c = measure(d, s, args.draws)
            cells.append(f"{a:+.2f}, {b:+.2f}, {c:+.2f}")
        print(f"| {s} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
