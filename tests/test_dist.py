"""The discrete marginals (initscope.stats.dist) and the compact maps the engine keeps."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from initscope.stats.dist import DTYPE, Dist
from initscope.stats.signal import shrink


def _sign_masses(d: Dist) -> tuple[float, float, float]:
    return float(d.w[d.x < 0].sum()), float(d.w[d.x == 0].sum()), float(d.w[d.x > 0].sum())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(600, 20000),
    st.sampled_from([32, 128, 512]),
    st.sampled_from(["normal", "relu", "relu+noise", "skewed", "ties"]),
)
def test_compress_keeps_moments_sign_masses_and_bins(seed, n, bins, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=DTYPE)
    if kind == "relu":
        x = x.clamp(min=0)
    elif kind == "relu+noise":  # a ReLU output plus a small Gaussian: many points just either side of 0
        x = x.clamp(min=0) + 0.05 * torch.randn(n, generator=g, dtype=DTYPE)
    elif kind == "skewed":
        x = torch.exp(2 * x) - 1.0
    elif kind == "ties":
        x = torch.round(4 * x) / 4
    w = torch.rand(n, generator=g, dtype=DTYPE) ** 3
    raw = Dist(*_sorted(x, w / w.sum()))
    d = Dist.of(x, w, bins)

    assert d.x.numel() <= 2 * bins + 3
    assert bool((d.x[1:] >= d.x[:-1]).all())
    assert bool((d.w >= 0).all())
    assert math.isclose(float(d.w.sum()), 1.0, rel_tol=1e-12)
    assert math.isclose(d.mean, raw.mean, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(d.m2, raw.m2, rel_tol=1e-9)
    # Each sign's probability is what a ReLU's mask sees: exact, not approximately kept.
    for got, want in zip(_sign_masses(d), _sign_masses(raw)):
        assert abs(got - want) < 1e-12
    # Every output point lies within the range of the input points.
    assert float(d.x[0]) >= float(raw.x[0]) - 1e-12 and float(d.x[-1]) <= float(raw.x[-1]) + 1e-12


def _sorted(x, w):
    x, order = torch.sort(x, stable=True)
    return x, w[order]


def test_compress_near_zero_does_not_move_mass_across_zero():
    # A bin of negative points just below 0 whose spread, placed symmetrically about its mean, would
    # cross into the positive side (the case that used to leak ~1% of mass across 0 in ResNet adds).
    x = torch.cat([torch.full((500,), -1e-3, dtype=DTYPE), torch.full((10,), -1e-6, dtype=DTYPE),
                   torch.linspace(0.5, 3.0, 2000, dtype=DTYPE)])
    w = torch.cat([torch.full((500,), 1e-4, dtype=DTYPE), torch.full((10,), 0.05, dtype=DTYPE),
                   torch.full((2000,), 1e-4, dtype=DTYPE)])
    d = Dist.of(x, w, 8)
    neg, zero, pos = _sign_masses(d)
    total = float(w.sum())
    assert abs(neg - float(w[x < 0].sum()) / total) < 1e-14
    assert zero == 0.0
    assert abs(pos - float(w[x > 0].sum()) / total) < 1e-14


def test_add_gaussian_keeps_moments_of_the_sum():
    base = Dist.gaussian().map(torch.relu).standardized()
    s = 0.7
    d = base.add_gaussian(s)
    assert math.isclose(d.mean, base.mean, rel_tol=1e-9)
    assert math.isclose(d.m2, base.m2 + s * s, rel_tol=1e-9)
    # P(X + sZ > 0) for X a ReLU of a standard normal: P(X = 0) P(Z > 0) + P(X > 0) (≈ 1 - 1/4)
    # checked against Monte Carlo with a wide margin for its noise.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=g, dtype=DTYPE)
    mc = float(((torch.relu(z) / math.sqrt(0.5) + s * torch.randn(z.shape, generator=g, dtype=DTYPE)) > 0).double().mean())
    assert abs(_sign_masses(d)[2] - mc) < 2e-3


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 5.0))
def test_add_gaussian_is_exact_for_what_a_relu_reads(seed, s):
    # P(Y > 0), E[relu(Y)] and E[relu(Y)²] for Y = X + sZ, against the closed forms summed over X's points.
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(3000, generator=g, dtype=DTYPE)) + 0.3 * torch.randn(3000, generator=g, dtype=DTYPE)
    base = Dist.of(x, torch.rand(3000, generator=g, dtype=DTYPE) + 0.1)
    d = base.add_gaussian(s)
    a = base.x / s
    cdf = 0.5 * torch.erfc(-a / math.sqrt(2))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    p = float((base.w * cdf).sum())
    relu1 = float((base.w * (base.x * cdf + s * pdf)).sum())
    relu2 = float((base.w * ((base.x**2 + s * s) * cdf + s * base.x * pdf)).sum())
    assert math.isclose(_sign_masses(d)[2], p, rel_tol=1e-12, abs_tol=1e-14)
    assert math.isclose(d.expect(torch.relu), relu1, rel_tol=1e-10)
    assert math.isclose(d.expect(lambda t: torch.relu(t) ** 2), relu2, rel_tol=1e-10)
    assert math.isclose(d.m2, base.m2 + s * s, rel_tol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 2**31 - 1), st.data())
def test_shrink_is_the_same_map(shape, seed, data):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g, dtype=DTYPE)
    # make some dims constant
    for dim in range(len(shape)):
        if data.draw(st.booleans()):
            m = m.narrow(dim, 0, 1).expand(*m.shape)
    s = shrink(m)
    assert torch.equal(s.expand(m.shape), m)
    for dim in range(len(shape)):
        if m.shape[dim] > 1 and torch.equal(m, m.narrow(dim, 0, 1).expand_as(m)):
            assert s.shape[dim] == 1


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 2000))
def test_gaussians_keep_sign_masses_and_relu_moments_exactly(seed, n):
    # A mixture of N(t_i, s_i²) (an eval-mode BatchNorm's channels, each shifted by its running
    # mean): what a ReLU after it reads is exact, through the halves and through compression.
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=DTYPE) * 2
    s = torch.rand(n, generator=g, dtype=DTYPE) * 3 + 0.01
    w = torch.rand(n, generator=g, dtype=DTYPE) + 0.1
    d = Dist.gaussians(t, s, w)
    a = t / s
    cdf = 0.5 * torch.erfc(-a / math.sqrt(2))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    p = w / w.sum()
    positive = float((p * cdf).sum())
    relu1 = float((p * (t * cdf + s * pdf)).sum())
    relu2 = float((p * ((t * t + s * s) * cdf + t * s * pdf)).sum())
    assert float(d.w[d.x > 0].sum()) == pytest.approx(positive, rel=1e-9, abs=1e-12)
    assert d.expect(lambda x: x.clamp(min=0)) == pytest.approx(relu1, rel=1e-9, abs=1e-12)
    assert d.expect(lambda x: x.clamp(min=0) ** 2) == pytest.approx(relu2, rel=1e-9, abs=1e-12)
    assert d.m2 == pytest.approx(float((p * (t * t + s * s)).sum()), rel=1e-9)
    assert d.x.numel() <= 2 * 512 + 3
