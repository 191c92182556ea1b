"""Attention, token layouts and the decoder's ops against Monte Carlo, and the two agreement tests of
issue 17: a ViT-Tiny-like transformer and a U-Net-like encoder–decoder (docs/theory.md, "Attention")."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initscope
from initscope.measure import measure
from initscope.models.unet import unet_like
from initscope.models.vit import vit_tiny_like

E, L = 48, 17


def _gaps(p, me):
    fwd = {l.name: math.log2(me.out_var[l.name] / l.pred_out_var) for l in p.layers}
    bwd = {l.name: math.log2(me.in_grad_var[l.name] / l.pred_in_grad_var) for l in p.layers}
    return fwd, bwd


def _assert_within(p, me, bound, what=""):
    fwd, bwd = _gaps(p, me)
    for name in fwd:
        assert abs(fwd[name]) < bound, f"{what}forward at {name} off by 2^{fwd[name]:+.3f}"
        assert abs(bwd[name]) < bound, f"{what}gradient at {name} off by 2^{bwd[name]:+.3f}"


class Tokens(nn.Module):
    """A Linear on tokens, the op, a Linear: the OPS pattern of tests/test_rules_mc.py for (N, L, E)."""

    def __init__(self, op):
        super().__init__()
        self.a, self.op, self.b = nn.Linear(E, E, bias=False), op, nn.Linear(E, 32, bias=False)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


class SelfAttention(nn.Module):
    """timm's attention after the block's LayerNorm: one qkv Linear, the fused op, heads merged back.

    (Without the norm each token's length fluctuates, χ² with E degrees of freedom, and the softmax
    sees logits of varying scale: not modelled, docs/theory.md "What is not closed".)"""

    def __init__(self, fused=True, heads=4):
        super().__init__()
        self.fused, self.heads = fused, heads
        self.norm = nn.LayerNorm(E)
        self.qkv = nn.Linear(E, 3 * E, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            o = a.softmax(dim=-1) @ v
        return o.transpose(1, 2).flatten(2)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, 4, batch_first=True)

    def forward(self, x):
        x = self.norm(x)
        return self.attn(x, x, x, need_weights=False)[0]


class Correlated(nn.Module):
    """x + a shared token: tokens correlated (ρ ≈ 1/2), what attention meets after a few blocks."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x + x.mean(dim=1, keepdim=True) * math.sqrt(L))


TOKEN_OPS = {
    "sdpa": lambda: SelfAttention(),
    "softmax_matmul": lambda: SelfAttention(fused=False),
    "layernorm_gelu": lambda: nn.Sequential(nn.LayerNorm(E), nn.GELU()),
    "rmsnorm": lambda: nn.RMSNorm(E),
}


@pytest.mark.parametrize("op", sorted(TOKEN_OPS))
def test_token_rule_matches_monte_carlo(op):
    torch.manual_seed(0)
    model = Tokens(TOKEN_OPS[op]())
    p = initscope.plan(model, "kaiming-forward", input_shape=(L, E), cache=False)
    me = measure(model, p, (L, E), batch=16, draws=16, seed=0)
    _assert_within(p, me, 0.2, f"{op}: ")


def test_multihead_attention_projections_are_weight_layers():
    # nn.MultiheadAttention holds its q, k, v projections in one parameter: traced as its ops, the
    # in_proj_weight and the out_proj are planned, written, and predicted like any Linear.
    torch.manual_seed(0)
    model = Tokens(Mha())
    p = initscope.plan(model, "asv-forward-exact", input_shape=(L, E), cache=False)
    names = [l.weight_path for l in p.layers]
    assert "op.attn.in_proj_weight" in names and "op.attn.out_proj.weight" in names
    p.apply(model, generator=torch.Generator().manual_seed(0))
    w = model.op.attn.in_proj_weight.detach()
    assert float(w.std()) == pytest.approx(p["op.attn"].std, rel=0.05)
    # The probe measures modules, and the in_proj is none: b's output is measured by hand.
    outs = []
    for d in range(16):
        g = torch.Generator().manual_seed(d)
        p.apply(model, generator=g)
        with torch.no_grad():
            outs.append(float((model(torch.randn(16, L, E, generator=g)) ** 2).mean()))
    measured = math.exp(sum(math.log(o) for o in outs) / len(outs))
    assert abs(math.log2(measured / p["b"].pred_out_var)) < 0.2


def test_simulation_projects_q_k_v_from_the_same_tokens():
    # q, k, v = x Wq, x Wk, x Wv: given the tokens they are independent, but over tokens they carry the
    # tokens' overlaps x_i·x_j/E. With a flat softmax ∂L/∂q_i sums (g·v_j) k_j over the keys, and those
    # overlaps add a factor 1 + (L - 1)/E that independent fields miss (docs/theory.md, section 6).
    from initscope.rules.attention import simulate

    length, width, heads, batch = 33, 64, 4, 16
    d = width // heads
    s2 = 0.16  # E[q²]: logits of variance 0.026, a flat softmax
    got = []
    for draw in range(24):
        gen = torch.Generator().manual_seed(draw)
        x = F.layer_norm(torch.randn(batch, length, width, generator=gen, dtype=torch.float64), (width,))
        w = torch.randn(3 * width, width, generator=gen, dtype=torch.float64) * math.sqrt(s2 / width)
        q, k, v = (x @ w.T).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)
        q.requires_grad_(True)
        o = F.scaled_dot_product_attention(q, k, v)
        (gq,) = torch.autograd.grad(o, q, torch.randn(o.shape, generator=gen, dtype=torch.float64))
        got.append(float((gq**2).mean()))
    measured = sum(got) / len(got)
    m = torch.full((length,), s2, dtype=torch.float64)
    ones = torch.ones(length, dtype=torch.float64)
    shared = float(simulate(m, m, m, 0, 0, 0, d, d, d**-0.5, g=ones, width_in=width).gq.mean())
    independent = float(simulate(m, m, m, 0, 0, 0, d, d, d**-0.5, g=ones).gq.mean())
    assert abs(math.log2(measured / shared)) < 0.1
    assert math.log2(measured / independent) == pytest.approx(math.log2(1 + (length - 1) / width), abs=0.1)


def test_simulation_samples_a_class_token_afresh(monkeypatch):
    # Under a one-hot softmax the gradient that one query (a class token carrying the head's gradient)
    # sends through the softmax is a rare event per simulated row: the full simulation's 252 rows left
    # its q gradient ±9 % (and what it sends a key ±80 %) on the seed, and the error went into every block.
    # Drawn afresh 64 times per row against the same keys, it is held to the op at ViT-Tiny's shape.
    import initscope.rules.attention as A

    length, width, heads, batch = 65, 192, 3, 16
    d = width // heads
    s2 = 6.0  # E[q²]: logits of variance 36
    got = {"gq0": [], "gk": [], "gv": []}
    sums = {"gk": [], "gv": []}  # E|Σ_j g_j|² per element: the cross terms the token correlation carries
    for draw in range(32):
        gen = torch.Generator().manual_seed(draw)
        x = F.layer_norm(torch.randn(batch, length, width, generator=gen, dtype=torch.float64), (width,))
        w = torch.randn(3 * width, width, generator=gen, dtype=torch.float64) * math.sqrt(s2 / width)
        q, k, v = (t.requires_grad_(True) for t in (x @ w.T).unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0))
        o = F.scaled_dot_product_attention(q, k, v)
        g = torch.zeros_like(o)
        g[:, :, 0] = torch.randn(batch, heads, d, generator=gen, dtype=torch.float64)
        gq, gk, gv = torch.autograd.grad(o, (q, k, v), g)
        got["gq0"].append(float((gq[:, :, 0] ** 2).mean()))
        got["gk"].append(float((gk**2).mean()))
        got["gv"].append(float((gv**2).mean()))
        sums["gk"].append(float((gk.sum(2) ** 2).mean()))
        sums["gv"].append(float((gv.sum(2) ** 2).mean()))
    m = torch.full((length,), s2, dtype=torch.float64)
    cls = torch.zeros(length, dtype=torch.float64)
    cls[0] = 1.0
    sims = []
    for seed in (0, 1):
        monkeypatch.setattr(A, "_SEED", seed)
        A._simulate_cached.cache_clear()
        sims.append(A.simulate(m, m, m, 0, 0, 0, d, d, d**-0.5, g=cls, width_in=width))
    A._simulate_cached.cache_clear()
    for key, pred in (("gq0", [float(s.gq[0]) for s in sims]), ("gk", [float(s.gk.mean()) for s in sims]),
                      ("gv", [float(s.gv.mean()) for s in sims])):
        measured = sum(got[key]) / len(got[key])
        assert abs(math.log2(pred[0] / pred[1])) < 0.06, (key, pred)
        # The keys' gradient is measured 0.11 bits above the Gaussian model at this shape (docs/theory.md,
        # "What is not closed").
        bound = 0.2 if key == "gk" else 0.1
        assert abs(math.log2(measured / pred[0])) < bound, (key, measured, pred[0])
    # What one query sends the keys sums to zero over them, and what it sends the values to its own
    # gradient: the token correlation the pass reads (cross terms rho·((Σ√m)² − Σm), tokens alike here)
    # is held to the op's. It was 0 for both when the class token was the only query with a gradient.
    for key, rho in (("gk", sims[0].gk_rho), ("gv", sims[0].gv_rho)):
        diag = length * sum(got[key]) / len(got[key])
        measured = (sum(sums[key]) / len(sums[key]) - diag) / (length * diag - diag)
        assert abs(rho - measured) < 0.1 * abs(measured) + 0.002, (key, rho, measured)


def test_lsuv_scales_weights_used_outside_their_module():
    # nn.MultiheadAttention uses in_proj_weight and out_proj.weight in F.multi_head_attention_forward, so
    # no forward hook sees their outputs: lsuv reads them off the traced graph.
    torch.manual_seed(0)
    model = Tokens(Mha())
    x = torch.randn(32, L, E)
    initscope.init_(model, "lsuv", example_input=x, generator=torch.Generator().manual_seed(0))
    attn = model.op.attn
    with torch.no_grad():
        h = model.op.norm(model.a(x))
        in_proj = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        out = model.op(model.a(x))
        logits = model(x)
    for name, t in (("in_proj", in_proj), ("out_proj", out), ("b", logits)):
        assert abs(float(t.var()) - 1.0) < 0.1, (name, float(t.var()))


def test_class_token_with_on_unknown_skip_plans():
    # torch.cat([cls.expand(B, -1, -1), x], 1): the expand of a constant sent an empty autograd call.
    from torchvision.models import vit_b_16

    model = vit_b_16(image_size=32)
    for how in ("skip", "kaiming", "error"):
        p = initscope.plan(model, "kaiming-forward", input_shape=(3, 32, 32), on_unknown=how, cache=False)
        assert len(p.layers) == 2 + 4 * 12


@pytest.mark.parametrize("name", ["swin_t", "maxvit_t"])
def test_index_buffers_with_on_unknown_skip_plan(name):
    # Relative-position index buffers are integer constants: they used to become float64 and fail
    # "tensors used as indices must be long" in the fallback.
    from torchvision import models

    model = models.get_model(name, weights=None)
    size = 224 if name == "maxvit_t" else 64
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, size, size), on_unknown="skip", cache=False)
    assert all(math.isfinite(l.std) and l.std > 0 for l in p.layers)


# -- the decoder's ops -----------------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, op, c_mid=24):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.op = op
        self.b = nn.Conv2d(c_mid, 16, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


DECODER_OPS = {
    "conv_transpose_2_2": lambda: nn.ConvTranspose2d(24, 32, 2, stride=2, bias=False),
    "conv_transpose_3_2_pad": lambda: nn.ConvTranspose2d(24, 32, 3, stride=2, padding=1, output_padding=1, bias=False),
    "conv_transpose_4_2_pad": lambda: nn.ConvTranspose2d(24, 32, 4, stride=2, padding=1, bias=False),
    "upsample_nearest": lambda: nn.Upsample(scale_factor=2),
    "upsample_bilinear": lambda: nn.Upsample(scale_factor=2, mode="bilinear"),
    "upsample_bilinear_corners": lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
}


@pytest.mark.parametrize("op", sorted(DECODER_OPS))
def test_decoder_rule_matches_monte_carlo(op):
    module = DECODER_OPS[op]()
    model = Decoder(module, 32 if isinstance(module, nn.ConvTranspose2d) else 24)
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, 8, 8), cache=False)
    me = measure(model, p, (3, 8, 8), batch=16, draws=24, seed=0)
    _assert_within(p, me, 0.2, f"{op}: ")


def test_conv_transpose_counts_its_borders():
    # eps counts the (input, output) pairs a weight joins: a 3x3/2 transposed conv with padding 1
    # crops the first row and column of taps.
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1))
    p = initscope.plan(model, "asv-forward", input_shape=(4, 5, 5), cache=False)
    layer = p.layers[0]
    taps = sum(1 for i in range(5) for t in range(3) if 0 <= 2 * i - 1 + t < 9)
    assert layer.eps == 6 * 4 * taps * taps
    assert layer.m_out == 6 * 9 * 9 and layer.kind == "conv_transpose2d"


# -- the agreement tests of issue 17, item 4 -------------------------------------------------------
METHODS = ["kaiming-forward", "asv-forward", "asv-backward", "asv-forward-exact", "asv-backward-exact"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_vit_tiny_like_predictions_hold(method, one_thread):
    model = vit_tiny_like()
    p = initscope.plan(model, method, input_shape=(3, 64, 64), cache=False)
    me = measure(model, p, (3, 64, 64), batch=16, draws=8, seed=0)
    fwd, bwd = _gaps(p, me)
    worst_f = max(fwd.items(), key=lambda kv: abs(kv[1]))
    assert abs(worst_f[1]) < 0.75, f"forward off by 2^{worst_f[1]:+.2f} at {worst_f[0]}"
    worst_b = max(bwd.items(), key=lambda kv: abs(kv[1]))
    assert abs(worst_b[1]) < 0.75, f"gradient off by 2^{worst_b[1]:+.2f} at {worst_b[0]}"
    if method == "asv-forward-exact":
        # The exact forward variant holds every layer whose output it sets at 1: the branch ends are
        # the residual policy's (scaled), the rest read a LayerNorm or the patches.
        held = [l for l in p.layers if l.residual_scale is None]
        assert all(l.pred_out_var == pytest.approx(1.0, rel=1e-6) for l in held)
        assert all(abs(fwd[l.name]) < 0.75 for l in held)


@pytest.mark.xfail(strict=True, reason="ill-posed on a pre-norm stream under a final LayerNorm: a layer's input "
                   "gradient hardly depends on its own std there (docs/theory.md, 'What is not closed')")
@pytest.mark.slow
def test_vit_tiny_like_exact_backward_holds_free_layers_at_one(one_thread):
    p = initscope.plan(vit_tiny_like(), "asv-backward-exact", input_shape=(3, 64, 64), cache=False)
    free = [l for l in p.layers if not l.clamped and l.residual_scale is None]
    assert free and all(l.pred_in_grad_var == pytest.approx(1.0, rel=1e-3) for l in free)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_unet_like_predictions_hold(method, one_thread):
    model = unet_like(width=48)
    p = initscope.plan(model, method, input_shape=(3, 32, 32), cache=False)
    me = measure(model, p, (3, 32, 32), batch=16, draws=8, seed=0)
    _assert_within(p, me, 0.75)
    if method == "asv-forward-exact":
        assert all(l.pred_out_var == pytest.approx(1.0, rel=1e-6) for l in p.layers)
    if method == "asv-backward-exact":
        assert all(l.pred_in_grad_var == pytest.approx(1.0, rel=1e-3) for l in p.layers)


class PreNormStack(nn.Module):
    """Pre-norm blocks between a patch embedding and a mean-pooled head (benchmarks/residual_prenorm.py)."""

    def __init__(self, depth: int, dim: int = 64):
        super().__init__()
        from initscope.models.vit import Block

        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.Sequential(*(Block(dim, 2) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 10))

    def forward(self, x):
        h = self.blocks(self.patch_embed(x).flatten(2).transpose(1, 2))
        return self.head(h).mean(1)


@pytest.mark.parametrize("growth", [2.0, 4.0])
def test_scale_policy_holds_a_pre_norm_stream_at_its_growth_at_any_depth(growth, one_thread):
    # docs/theory.md section 7: with a LayerNorm in front of every branch the stream grows additively, and
    # the scale policy sets each branch's end so that the stream's moment grows by `growth` over all adds
    # (width 64; at width 32, 16-wide heads read 0.13 bits low at growth 4, a finite-width effect).
    for depth in (4, 16):
        torch.manual_seed(0)
        model = PreNormStack(depth)
        logs = []
        for draw in range(3):
            initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), residual="scale",
                            residual_growth=growth, generator=torch.Generator().manual_seed(draw))
            with torch.no_grad():
                h0 = model.patch_embed(torch.randn(16, 3, 32, 32)).flatten(2).transpose(1, 2)
                logs.append(math.log2(float((model.blocks(h0) ** 2).mean() / (h0**2).mean())))
        assert sum(logs) / 3 == pytest.approx(math.log2(growth), abs=0.1), (depth, logs)
