"""Predictions against measurement on the issue's two nets (docs/theory.md has the numbers).

The issue asks for the geometric mean over 3 draws; at width 64 one draw's log2 E[u²] scatters with
sd ≈ 0.85 at depth (predicted by the finite-width model and measured), so a 3-draw mean is itself
uncertain by ±0.5 bits. The tests average 12 draws (batch 32) so that they test the model, not the seed.
"""

import pytest

import initscope
from initscope.models import create_model

from conftest import log2_gaps

METHODS = ["kaiming-forward", "asv-forward", "asv-backward", "asv-forward-exact", "asv-backward-exact", "asv-balanced"]
TOL = 0.75  # log2 units: a factor 2^0.75


@pytest.fixture(scope="module", params=["plain34", "resnet18-nobn"])
def net(request):
    return request.param, create_model(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_predictions_hold(net, method):
    name, model = net
    p = initscope.plan(model, method, input_shape=(3, 64, 64))
    fwd, bwd = log2_gaps(model, p, (3, 64, 64), batch=32, draws=12, seed=0)
    worst_f = max(range(len(fwd)), key=lambda i: abs(fwd[i]))
    worst_b = max(range(len(bwd)), key=lambda i: abs(bwd[i]))
    assert abs(fwd[worst_f]) < TOL, f"{name} {method}: forward off by 2^{fwd[worst_f]:+.2f} at {p.layers[worst_f].name}"
    assert abs(bwd[worst_b]) < TOL, f"{name} {method}: gradient off by 2^{bwd[worst_b]:+.2f} at {p.layers[worst_b].name}"


def test_exact_variants_hold_the_moment_at_one():
    model = create_model("plain34")
    fwd = initscope.plan(model, "asv-forward-exact", input_shape=(3, 64, 64))
    assert [l.pred_out_var for l in fwd.layers] == pytest.approx([1.0] * len(fwd.layers), rel=1e-6)
    bwd = initscope.plan(model, "asv-backward-exact", input_shape=(3, 64, 64))
    free = [l.pred_in_grad_var for l in bwd.layers if not l.clamped]
    assert free == pytest.approx([1.0] * len(free), rel=1e-3)
    # The clamp binds at the last conv before the global pool (asv.md); without it every layer gets 1.
    assert any(l.clamped for l in bwd.layers)
    open_ = initscope.plan(model, "asv-backward-exact", input_shape=(3, 64, 64), max_std_ratio=None)
    assert [l.pred_in_grad_var for l in open_.layers] == pytest.approx([1.0] * len(open_.layers), rel=1e-3)


def test_finite_width_spread_matches_measured_scatter():
    # The predicted draw-to-draw sd of log2 E[u²] against the sd over 16 draws, plain34 at width 16.
    import math

    import numpy as np
    import torch

    from initscope.measure import measure_once

    model = create_model("plain34", width=16)
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, 32, 32))
    names = [l.name for l in p.layers]
    rows = []
    for d in range(16):
        g = torch.Generator().manual_seed(d)
        p.apply(model, generator=g)
        me = measure_once(model, torch.randn(16, 3, 32, 32, generator=g), names, seed=d)
        rows.append([math.log2(me.out_var[n]) for n in names])
    measured_sd = np.array(rows).std(0, ddof=1)
    predicted = np.array([l.out_spread for l in p.layers])
    deep = slice(8, 33)
    ratio = float(np.median(measured_sd[deep] / predicted[deep]))
    assert 0.5 < ratio < 1.5, f"measured/predicted spread {ratio:.2f}"


@pytest.mark.slow
def test_batchnorm_resnet_gradients_hold_under_the_scale_policy():
    # Beyond the two nets: torchvision's ResNet-18 with BatchNorm under asv-backward (its
    # default `scale` policy). The gradient crosses 8 identity shortcuts whose masks agree; it was 0.8
    # bits off before the conditional shortcut share and the pooled BatchNorm mean (docs/theory.md §4).
    from torchvision.models import resnet18

    model = resnet18()
    p = initscope.plan(model, "asv-backward", input_shape=(3, 64, 64))
    fwd, bwd = log2_gaps(model, p, (3, 64, 64), batch=16, draws=4, seed=0)
    assert max(abs(g) for g in fwd) < TOL
    assert max(abs(g) for g in bwd) < 0.5, f"gradient off by up to 2^{max(bwd, key=abs):+.2f}"


def test_balanced_is_the_geometric_mean_of_the_exact_variants():
    # Forward and gradient cannot both be 1: asv-balanced splits the architecture's mismatch.
    import math

    model = create_model("plain34", width=16)
    f = initscope.plan(model, "asv-forward-exact", input_shape=(3, 72, 72))
    b = initscope.plan(model, "asv-backward-exact", input_shape=(3, 72, 72))
    m = initscope.plan(model, "asv-balanced", input_shape=(3, 72, 72))
    for lf, lb, lm in zip(f.layers, b.layers, m.layers):
        assert lm.std == pytest.approx(math.sqrt(lf.std * lb.std), rel=1e-12), lm.name
    mismatch = math.log2(b.layers[-1].pred_out_var)  # the logits under asv-backward-exact: 2^11.8 here
    assert mismatch > 10
    assert math.log2(m.layers[-1].pred_out_var) == pytest.approx(mismatch / 2, abs=0.3)
    assert math.log2(m.layers[0].pred_in_grad_var) == pytest.approx(-mismatch / 2, abs=0.3)
