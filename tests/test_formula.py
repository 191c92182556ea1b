"""ASV's formula (asv.md) against values computed by hand and by an independent reference."""

import math

import pytest
import torch
from scipy import integrate, stats
from torch import nn

import initscope
from initscope.models import plain34


def test_poster_numbers_at_224():
    # asv.md, "Numbers to check against": no clamp.
    model = plain34()
    fwd = initscope.plan(model, "asv-forward", input_shape=(3, 224, 224), max_std_ratio=None)
    bwd = initscope.plan(model, "asv-backward", input_shape=(3, 224, 224), max_std_ratio=None)
    assert [l.std for l in fwd.layers[:3]] == pytest.approx([0.0831, 0.0263, 0.0596], abs=6e-5)
    assert [l.std for l in bwd.layers[:3]] == pytest.approx([0.1081, 0.0596, 0.0596], abs=6e-5)


# -- an independent reference of the formula ---------------------------------------------------------
def _eps_brute(conv: nn.Conv2d, in_shape) -> int:
    """ε by brute force: a conv of ones with the ones kernel counts the in-bounds taps of every output."""
    ones = torch.ones(1, *in_shape, dtype=torch.float64)
    k = torch.ones(conv.in_channels // conv.groups, *conv.kernel_size, dtype=torch.float64)
    w = k.expand(conv.out_channels, *k.shape).contiguous()
    out = torch.nn.functional.conv2d(ones, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return int(round(float(out.sum())))


def _tau_max(t: int) -> float:
    f = lambda s: s * s * stats.norm.pdf(s) * stats.norm.cdf(s) ** (t - 1)
    return t * integrate.quad(f, 0, math.inf, epsabs=1e-13, epsrel=1e-13)[0]


def _reference(model: nn.Sequential, in_shape):
    """The asv.md table, block by block: (M_in, M_out, ε, τ, γ) per weight layer."""
    blocks, shape, i = [], tuple(in_shape), 0
    mods = list(model)
    while i < len(mods):
        layer = mods[i]
        x = torch.zeros(1, *shape)
        if isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
            i += 1
            continue
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        out = layer(x)
        eps = _eps_brute(layer, shape) if isinstance(layer, nn.Conv2d) else layer.in_features * layer.out_features
        m_in, m_out = math.prod(shape), out[0].numel()
        shape = tuple(out.shape[1:])
        tau, gamma, j = 1.0, 1.0, i + 1
        if j < len(mods) and isinstance(mods[j], nn.ReLU):
            tau, gamma, j = 0.5, 0.5, j + 1
            if j < len(mods) and isinstance(mods[j], (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                pool = mods[j]
                if isinstance(pool, nn.AdaptiveAvgPool2d):
                    t = shape[1] * shape[2]
                else:
                    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
                    t = k * k
                if isinstance(pool, nn.MaxPool2d):
                    tau, gamma = _tau_max(t), (1 - 2.0**-t) / t
                else:
                    tau, gamma = (1 + (t - 1) / math.pi) / (2 * t), 1 / (2 * t * t)
                shape = tuple(pool(torch.zeros(1, *shape)).shape[1:])
                j += 1
        blocks.append(dict(m_in=m_in, m_out=m_out, eps=eps, tau=tau, gamma=gamma))
        i = j
    return blocks


def _reference_stds(blocks, direction, ratio):
    stds, tau_prev = [], 1.0
    for b in blocks:
        if direction == "forward":
            var, base = b["m_out"] / (tau_prev * b["eps"]), b["m_out"] / (0.5 * b["eps"])
        else:
            var, base = b["m_in"] / (b["gamma"] * b["eps"]), b["m_in"] / (0.5 * b["eps"])
        std = math.sqrt(var)
        if ratio is not None:
            std = min(std, ratio * math.sqrt(base))
        stds.append(std)
        tau_prev = b["tau"]
    return stds


CHAINS = {
    "max": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, dilation=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 12, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    ),
    "linear": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 5),
    ),
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("ratio", [None, 3.0, 1.2])
def test_paper_formula_exactly(chain, direction, ratio):
    model = CHAINS[chain]()
    in_shape = (3, 33, 33) if chain == "max" else (1, 9, 9)
    p = initscope.plan(model, f"asv-{direction}", input_shape=in_shape, max_std_ratio=ratio)
    ref = _reference_stds(_reference(model, in_shape), direction, ratio)
    assert [l.std for l in p.layers] == pytest.approx(ref, rel=1e-6)
    if ratio == 1.2 and chain == "max":
        assert any(l.clamped for l in p.layers)


def test_kaiming_is_asv_without_borders_and_pools():
    # asv.md: with τ = γ = 1/2 and no padding, ASV is Kaiming. Interior layers of a padding-free chain.
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
    fwd = initscope.plan(model, "asv-forward", input_shape=(4, 12, 12), max_std_ratio=None)
    kai = initscope.plan(model, "kaiming-forward", input_shape=(4, 12, 12))
    assert fwd.layers[1].std == pytest.approx(kai.layers[1].std, rel=1e-9)
    assert fwd.layers[2].std == pytest.approx(kai.layers[2].std, rel=1e-9)
