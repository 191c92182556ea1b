"""Pre-norm transformer blocks at depth 12, 48, 192: where each residual scheme keeps the signal and
the gradient (docs/theory.md, "Residual policy for pre-norm transformers").

Measured on initscope.models.vit.VisionTransformer (width 64, 2 heads, 16 patches + class token),
Gaussian input, 2 weight draws: the residual stream's second moment after the last block over that
after the patch embedding (signal growth), and the gradient's second moment at the first block's
input over that at the last block's output (gradient growth), in bits.
"""

import math
import sys

import torch
from torch import nn

import initscope
from initscope.models.vit import VisionTransformer


def branch_ends(model):
    return [m for b in model.blocks for m in (b.attn.proj, b.fc2)]


def scheme(model, name, depth, gen):
    with torch.no_grad():
        if name.startswith("initscope"):
            method, policy = name.split(":")[1:]
            initscope.init_(model, method, input_shape=(3, 32, 32), residual=policy, generator=gen)
            return
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02, generator=gen)
                nn.init.zeros_(m.bias)
        if name == "nanogpt":  # 0.02/sqrt(2L) on the output projections
            for m in branch_ends(model):
                m.weight.mul_(1 / math.sqrt(2 * depth))
        elif name == "deepnorm":  # beta = (8N)^(-1/4) on v, out-projection and the MLP (encoder form)
            beta = (8 * depth) ** -0.25
            for b in model.blocks:
                b.attn.qkv.weight[2 * b.attn.qkv.out_features // 3:].mul_(beta)
                b.attn.proj.weight.mul_(beta)
                b.fc1.weight.mul_(beta)
                b.fc2.weight.mul_(beta)
        elif name == "tfixup":  # 0.67 N^(-1/4) on v, out-projection and the MLP (encoder form)
            f = 0.67 * depth ** -0.25
            for b in model.blocks:
                b.attn.qkv.weight[2 * b.attn.qkv.out_features // 3:].mul_(f)
                for m in (b.attn.proj, b.fc1, b.fc2):
                    m.weight.mul_(f)
        elif name == "umup":  # unit-scaled branches (Xavier-like 1/sqrt(fan_in)) added with tau = 1/sqrt(2L)
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=gen)
            for m in branch_ends(model):
                m.weight.mul_(1 / math.sqrt(2 * depth))


def measure(depth, name, draws=2):
    model = VisionTransformer(image_size=32, patch=8, dim=64, depth=depth, heads=2)
    sig, grad = [], []
    for d in range(draws):
        gen = torch.Generator().manual_seed(d)
        scheme(model, name, depth, gen)
        x = torch.randn(16, 3, 32, 32, generator=gen)
        h0 = model.patch_embed(x).flatten(2).transpose(1, 2)
        h0 = torch.cat([model.cls_token.expand(16, -1, -1), h0], 1) + model.pos_embed
        h0.retain_grad()
        h = model.blocks(h0)
        h.retain_grad()
        out = model.head(model.norm(h)[:, 0])
        out.backward(torch.randn(out.shape, generator=gen))
        sig.append(math.log2(float((h**2).mean()) / float((h0**2).mean())))
        grad.append(math.log2(float((h0.grad**2).mean()) / float((h.grad**2).mean())))
    return sum(sig) / draws, sum(grad) / draws


if __name__ == "__main__":
    torch.set_num_threads(1)
    schemes = ["default-0.02", "nanogpt", "tfixup", "deepnorm", "umup", "initscope:asv-forward-exact:scale",
               "initscope:asv-forward-exact:none", "initscope:kaiming-forward:none"]
    depths = [int(d) for d in sys.argv[1:]] or [12, 48, 192]
    print("| scheme | " + " | ".join(f"L={d}: signal, gradient (bits)" for d in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for s in schemes:
        cells = []
        for d in depths:
            a, b = measure(d, s)
            cells.append(f"{a:+.1f}, {b:+.1f}")
        print(f"| {s} | " + " | ".join(cells) + " |", flush=True)
