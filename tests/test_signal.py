"""The Signal's named parts (initscope.stats.signal): the layout they read, and what ``with_`` keeps."""

import dataclasses
import math
import re

import pytest
import torch

from initscope.stats.dist import DTYPE, Dist
from initscope.stats.elementwise import Activation
from initscope.stats.signal import (
    CHANNELS_FIRST,
    NO_SCATTER,
    UNCORRELATED,
    Activated,
    Blocks,
    Grad,
    Layout,
    Scatter,
    Shared,
    Signal,
    Spatial,
    channel_blocks,
    channel_map,
)

RECORDS = (Layout, Spatial, Shared, Activated, Blocks, Scatter)


def _map(*shape: int) -> torch.Tensor:
    return torch.arange(1, torch.Size(shape).numel() + 1, dtype=DTYPE).reshape(shape)


def test_every_record_is_frozen_and_says_what_keeps_it():
    for cls in RECORDS:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert re.search(r"\bke(ep|pt)", cls.__doc__ or "", re.I), f"{cls.__name__}'s docstring should say which ops keep it"
    for cls in RECORDS[1:]:
        assert isinstance(cls.invalidated_by, frozenset), cls
        known = {f.name for f in dataclasses.fields(Signal)}
        assert cls.invalidated_by <= known, f"{cls.__name__} names fields a Signal does not have"


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (1, 3, 7), (1, 3)])
def test_the_default_layout_is_batch_channel_then_positions(shape):
    shape = torch.Size(shape)
    m2 = _map(*shape)
    s = Signal(shape, m2)
    assert s.layout == CHANNELS_FIRST
    assert s.spatial_shape == shape[2:]
    assert s.positions == shape[2:].numel()
    torch.testing.assert_close(s.channel_map(), m2.mean(dim=(0, 1)), rtol=0, atol=0)


def test_a_token_layout_reads_its_positions_and_channels_where_it_says():
    # (N, L, E): positions are the L tokens, channels the E features.
    shape = torch.Size((1, 6, 4))
    tokens = Layout(channel=-1, spatial=(1,))
    m2 = _map(*shape)
    s = Signal(shape, m2, tokens)
    assert s.spatial_shape == torch.Size((6,)) and s.positions == 6
    torch.testing.assert_close(s.channel_map(), m2.mean(dim=(0, 2)), rtol=0, atol=0)
    torch.testing.assert_close(channel_map(m2, shape, tokens), m2.mean(dim=(0, 2)), rtol=0, atol=0)
    assert s.full().shape == (6, 6)
    halves = (Signal(torch.Size((1, 6, 1)), m2[..., :1], tokens), Signal(torch.Size((1, 6, 3)), m2[..., 1:], tokens))
    cat = Signal(shape, m2, tokens, blocks=Blocks(halves))
    assert [(start, n) for start, n, _ in channel_blocks(cat)] == [(0, 1), (1, 3)]
    assert Grad(shape, m2, tokens).positions == 6


def _rich() -> Signal:
    shape = torch.Size((1, 4, 2, 2))
    relu = Activation.probe("test_signal.relu", torch.relu)
    pre = Signal.unit(shape, 2.0)
    block = Signal.unit(torch.Size((1, 2, 2, 2)))
    return Signal(
        shape,
        _map(1, 4, 2, 2),
        spatial=Spatial(torch.eye(4, dtype=DTYPE).reshape(2, 2, 2, 2), 0.25),
        shared=Shared(0.3, 0.2),
        dist=Dist.gaussian().map(torch.relu).standardized(),
        activated=Activated(relu, pre),
        blocks=Blocks((block, block)),
        scatter=Scatter(0.01, 8, 0.002),
    )


def test_with_drops_what_a_change_invalidates_and_keeps_the_rest():
    x = _rich()
    # The scatter is over weight draws: changing it leaves every statistic of the values standing.
    y = x.with_(scatter=NO_SCATTER)
    assert (y.spatial, y.shared, y.dist, y.activated, y.blocks) == (x.spatial, x.shared, x.dist, x.activated, x.blocks)
    # A new second moment: the covariance (in its units), the activation record and the blocks go;
    # the shares and the marginal (scale-free) and the scatter stay.
    y = x.with_(m2=x.m2 * 3)
    assert y.spatial is UNCORRELATED and y.activated is None and y.blocks is None
    assert (y.shared, y.dist, y.scatter) == (x.shared, x.dist, x.scatter)
    # Given anew in the same call, a record is kept.
    spatial = Spatial(None, 0.5)
    y = x.with_(m2=x.m2 * 3, spatial=spatial)
    assert y.spatial is spatial and y.blocks is None
    # A new marginal: the values are no longer f(pre), and the blocks no longer describe them.
    y = x.with_(dist=None)
    assert y.activated is None and y.blocks is None and y.spatial is x.spatial
    # A new shape: the shares go too (which elements share a channel has changed).
    y = x.with_(shape=torch.Size((1, 16)), m2=x.m2.reshape(1, 16))
    assert y.shared == Shared() and y.spatial is UNCORRELATED


def test_a_factor_keeps_every_part_scaled():
    x = _rich()
    y = x.scaled(4.0)
    torch.testing.assert_close(y.m2, x.m2 * 4.0)
    torch.testing.assert_close(y.spatial.cov, x.spatial.cov * 4.0)
    assert y.spatial.rho == x.spatial.rho and y.shared == x.shared and y.dist is x.dist
    assert y.activated.pre.mean_m2 == pytest.approx(x.activated.pre.mean_m2 * 4.0)
    assert [b.mean_m2 for b in y.blocks.parts] == pytest.approx([b.mean_m2 * 4.0 for b in x.blocks.parts])
    assert y.scatter == x.scatter and y.mean_m2 == pytest.approx(x.mean_m2 * 4.0)
    # f(a u) = a f(u) only for a positively homogeneous f.
    tanh = Activation.probe("test_signal.tanh", torch.tanh)
    assert x.with_(activated=Activated(tanh, x.activated.pre)).scaled(4.0).activated is None


def test_a_gradient_drops_its_spatial_statistics_with_its_layout():
    g = Grad(torch.Size((1, 2, 3, 3)), torch.ones(1, 1, 1, 1, dtype=DTYPE), spatial=Spatial(None, 0.4),
             scatter=Scatter(0.02))
    assert g.with_(scatter=Scatter(0.03)).spatial is g.spatial
    assert g.with_(layout=Layout(channel=-1, spatial=(1,))).spatial is UNCORRELATED
    s = (g + g.scaled(3.0))
    assert s.spatial.rho == pytest.approx(0.4) and s.scatter.logvar == pytest.approx(0.02)


def test_a_sum_of_gradients_keeps_their_cross_terms():
    # A ViT's stream gradient: the class token's alone (from the head) plus every token's, correlated
    # (from the blocks). The sum's correlation, read as rho·√(m_p m_q) like every other, must give back
    # the cross terms E|Σ_p g_p|² − Σ_p E[g_p²] of the sum of the two (measured by drawing them).
    from initscope.stats.signal import Layout, Spatial

    length, width, rows = 17, 32, 20000
    head = torch.zeros(length, dtype=torch.float64)
    head[0] = 400.0
    blocks = torch.full((length,), 1.0, dtype=torch.float64)
    rho_blocks = 0.3
    shape = torch.Size((rows, length, width))
    lay = Layout(-1, (1,))
    a = Grad(shape, head.reshape(-1, 1), lay, Spatial(rho=0.0))
    b = Grad(shape, blocks.reshape(-1, 1), lay, Spatial(rho=rho_blocks))
    total = a + b

    gen = torch.Generator().manual_seed(0)
    draw_a = torch.zeros(rows, length, width, dtype=torch.float64)
    draw_a[:, 0] = torch.randn(rows, width, generator=gen, dtype=torch.float64) * head[0].sqrt()
    common = torch.randn(rows, 1, width, generator=gen, dtype=torch.float64)
    own = torch.randn(rows, length, width, generator=gen, dtype=torch.float64)
    draw_b = math.sqrt(rho_blocks) * common + math.sqrt(1 - rho_blocks) * own
    g = draw_a + draw_b
    m = g.pow(2).mean(dim=(0, 2))
    pairs = float(g.sum(1).pow(2).mean()) - float(m.sum())
    predicted = total.spatial.rho * (float(m.sqrt().sum()) ** 2 - float(m.sum()))
    assert predicted == pytest.approx(pairs, rel=0.05)
    # Weighted by second moment, as before, the blocks' correlation was divided by the head's share:
    weighted = rho_blocks * float(blocks.mean()) / float((head + blocks).mean())
    assert weighted < 0.25 * total.spatial.rho
