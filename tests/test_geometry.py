"""ε, the exact tap count, against brute force: a conv of ones with the ones kernel."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import initscope
from initscope.geometry import Axis


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    dims = draw(st.sampled_from([1, 2, 3]))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 4)) for _ in range(dims))
    length = tuple(draw(st.integers(1, 12 if dims < 3 else 7)) for _ in range(dims))
    return groups, c_in, c_out, kernel, stride, dilation, padding, length


def _fits(kernel, stride, dilation, padding, length):
    return all(l + 2 * p - d * (k - 1) - 1 >= 0 for k, d, p, l in zip(kernel, dilation, padding, length))


@settings(max_examples=120, deadline=None)
@given(conv_configs())
def test_eps_equals_brute_force(cfg):
    groups, c_in, c_out, kernel, stride, dilation, padding, length = cfg
    if not _fits(kernel, stride, dilation, padding, length):
        return
    dims = len(kernel)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
    fn = [F.conv1d, F.conv2d, F.conv3d][dims - 1]
    ones = torch.ones(1, c_in, *length, dtype=torch.float64)
    w = torch.ones(c_out, c_in // groups, *kernel, dtype=torch.float64)
    brute = int(round(float(fn(ones, w, None, stride, padding, dilation, groups).sum())))
    if brute == 0:  # every tap reads padding: ASV is undefined and says why
        with pytest.raises(ValueError, match="nothing but padding"):
            initscope.plan(nn.Sequential(conv), "asv-forward", input_shape=(c_in, *length))
        return
    p = initscope.plan(nn.Sequential(conv), "asv-forward", input_shape=(c_in, *length))
    assert p.layers[0].eps == brute


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 4), st.integers(1, 4), st.integers(0, 6), st.integers(0, 6))
def test_axis_closed_form_matches_its_selection_matrix(length, kernel, stride, dilation, lo, hi):
    if length + lo + hi - dilation * (kernel - 1) - 1 < 0:
        return
    axis = Axis(length, kernel, stride, dilation, lo, hi)
    assert axis.tap_count() == int(axis.counts.sum())


def test_asv_md_small_map_factors():
    # asv.md: average fan-in of a 3x3, padding-1 conv on n x n is 9 C ((3n-2)/(3n))^2.
    for n, factor in [(7, 0.82), (4, 0.69), (2, 0.44)]:
        p = initscope.plan(nn.Sequential(nn.Conv2d(5, 6, 3, padding=1)), "asv-forward", input_shape=(5, n, n))
        layer = p.layers[0]
        avg_fan_in = layer.eps / layer.m_out
        assert avg_fan_in / (9 * 5) == __import__("pytest").approx(((3 * n - 2) / (3 * n)) ** 2, rel=1e-12)
        assert round(avg_fan_in / 45, 2) == factor
