"""Where the ViT-Tiny-like model's attention gradients leave the prediction (docs/theory.md, "What is not
closed"): per block, the gradient arriving at the attention's output and the gradients it sends q, k
and v, measured (whole-tensor means, geometric mean over draws) against what the plan's simulation
computed, and the token correlation of q and of the arriving gradient (all tokens, and without the
class token).

    python benchmarks/vit_attention_gaps.py [--method asv-backward-exact] [--draws 8]

The predictions are read off the plan as it is made: the attention rule's backward is wrapped to keep
its inputs and the simulation's outputs (the pass keeps no per-node record that a script could read).
"""

from __future__ import annotations

import argparse
import math

import torch

import initscope
from initscope.models.vit import vit_tiny_like
from initscope.rules import attention


def _corr(t: torch.Tensor, skip_first: bool = False) -> float:
    """Token correlation of ``(N, L, C)`` as the pass reads one: the cross terms of ``E|Σ_i t_i|²`` over
    ``(Σ_i √m_i)² − Σ_i m_i``, m_i each token's second moment."""
    t = t[:, 1:] if skip_first else t
    m = t.pow(2).mean(dim=(0, 2))
    pairs = float(t.sum(1).pow(2).mean()) - float(m.sum())
    room = float(m.sqrt().sum()) ** 2 - float(m.sum())
    return pairs / room if room > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="asv-backward-exact")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)

    # -- the plan, keeping what each attention's backward saw and computed --
    predicted: list[dict] = []
    backward = attention.attention_backward

    def keeping(ctx, grad):
        call = ctx.get(attention.AttentionCall)
        out = backward(ctx, grad)
        g = attention._token_map(grad.total(), grad.shape, -2)
        q_map = attention._token_map(call.q.m2, call.q.shape, -2)
        parts = [out[s].m2.mean() if s in out else torch.tensor(0.0) for s in (call.q, call.k, call.v)]
        predicted.append({"g": float(g.mean()), "q": float(q_map.mean()), "rho_q": attention._corr(call.q, -2),
                          "rho_g": attention._corr(grad, -2), "gq": float(parts[0]), "gk": float(parts[1]),
                          "gv": float(parts[2])})
        return out

    attention.attention_backward = keeping
    try:
        torch.manual_seed(0)
        model = vit_tiny_like()
        plan = initscope.plan(model, args.method, input_shape=(3, 64, 64), cache=False)
    finally:
        attention.attention_backward = backward
    depth = len(model.blocks)
    predicted = predicted[-depth:][::-1]  # the last pass's, from the first block on

    # -- the measurement: qkv's output (q, k, v side by side) and proj's input (the arriving gradient) --
    kept: dict = {}

    def keep(name):
        def hook(module, inputs, output=None):
            t = inputs[0] if output is None else output
            t.retain_grad()
            kept[name] = t
        return hook

    for b, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_hook(keep(("qkv", b)))
        block.attn.proj.register_forward_pre_hook(keep(("o", b)))
    logs: dict = {}
    for d in range(args.draws):
        gen = torch.Generator().manual_seed(1000 * d)
        plan.apply(model, generator=gen)
        x = torch.randn(args.batch, 3, 64, 64, generator=gen)
        out = model(x)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        for b in range(depth):
            qkv, g = kept[("qkv", b)], kept[("o", b)].grad.detach().double()
            q = qkv.detach().double().chunk(3, dim=-1)[0]
            gq, gk, gv = qkv.grad.detach().double().chunk(3, dim=-1)
            values = {"g": g.pow(2).mean(), "q": q.pow(2).mean(), "gq": gq.pow(2).mean(), "gk": gk.pow(2).mean(),
                      "gv": gv.pow(2).mean()}
            for key, v in values.items():
                logs.setdefault((b, key), []).append(math.log(float(v)))
            for key, v in (("rho_q", _corr(q)), ("rho_g", _corr(g)), ("rho_g_rest", _corr(g, True))):
                logs.setdefault((b, key), []).append(v)

    # -- the table: log2 measured / predicted --
    def gap(b, key):
        return sum(logs[(b, key)]) / len(logs[(b, key)]) / math.log(2) - math.log2(predicted[b][key])

    def mean(b, key):
        return sum(logs[(b, key)]) / len(logs[(b, key)])

    print(f"{args.method}, {args.draws} draws of batch {args.batch}: log2 measured/predicted")
    print("block  q fwd   arriving g   to q    to k    to v  | rho_q meas/pred   rho_g meas (no cls)/pred")
    for b in range(depth):
        p = predicted[b]
        print(f"{b + 1:5d}  {gap(b, 'q'):+.2f}   {gap(b, 'g'):+.2f}      {gap(b, 'gq'):+.2f}   {gap(b, 'gk'):+.2f}   "
              f"{gap(b, 'gv'):+.2f}  |  {mean(b, 'rho_q'):.3f}/{p['rho_q']:.3f}   "
              f"{mean(b, 'rho_g'):+.3f} ({mean(b, 'rho_g_rest'):+.3f})/{p['rho_g']:+.3f}")


if __name__ == "__main__":
    main()
