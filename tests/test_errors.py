"""Bad input gets a clear error and leaves the model's weights untouched."""

import pytest
import torch
from torch import nn

import initscope
from initscope import PlanMismatchError, TraceError, UnknownOpError


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_input_shape_names_it_and_writes_nothing():
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"input_shape=\(5, 32, 32\)"):
        initscope.init_(model, "asv-forward", input_shape=(5, 32, 32))
    assert _unchanged(model, before)


def test_input_shape_and_example_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        initscope.plan(_net(), "xavier")


def test_model_without_weight_layers():
    with pytest.raises(ValueError, match="no Conv1d/2d/3d or Linear"):
        initscope.plan(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), "xavier", input_shape=(3, 8, 8))


def test_lazy_module_not_materialized():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="lazy module"):
        initscope.init_(model, "kaiming-forward", input_shape=(3, 8, 8))


def test_unknown_method_lists_valid_ones():
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="asv-backward-exact"):
        initscope.init_(model, "asv", input_shape=(3, 8, 8))
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(distribution="cauchy"), "truncated_normal"),
        (dict(max_std_ratio=-1), "max_std_ratio"),
        (dict(fan="fanciest"), "framework"),
        (dict(residual="maybe"), "scale"),
        (dict(on_unknown="ignore"), "kaiming"),
    ],
)
def test_bad_option_values(option, match):
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        initscope.init_(model, "asv-forward", input_shape=(3, 8, 8), **option)
    assert _unchanged(model, before)


def test_unknown_option_name():
    with pytest.raises(TypeError, match="valid options"):
        initscope.plan(_net(), "xavier", input_shape=(3, 8, 8), clamp=2)


class Swish3(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(3 * x)


class Odd(nn.Module):
    """An op with no rule inside a module: torch.erf is not modelled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.erf(self.conv(x))


def test_unknown_op_names_node_and_module_and_fix():
    model = nn.Sequential(Odd(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(UnknownOpError) as info:
        initscope.plan(model, "kaiming-forward", input_shape=(3, 8, 8))
    msg = str(info.value)
    assert "erf" in msg and "'0'" in msg and "register_rule" in msg and "on_unknown" in msg


def test_on_unknown_skip_and_kaiming_plan_anyway():
    model = nn.Sequential(Odd(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.warns(UserWarning, match="no rule"):
        p = initscope.plan(model, "kaiming-forward", input_shape=(3, 8, 8), on_unknown="skip")
    assert len(p.layers) == 2


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return x


def test_untraceable_model_names_module_and_what_to_do():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Untraceable())
    with pytest.raises(TraceError) as info:
        initscope.plan(model, "xavier", input_shape=(3, 8, 8))
    msg = str(info.value)
    assert "'1'" in msg and "register_rule" in msg


def test_registration_refuses_duplicates():
    with pytest.raises(ValueError, match="already"):
        initscope.register_rule(nn.ReLU)(type("Again", (initscope.Rule,), {}))


def test_custom_rule_registration_roundtrip():
    @initscope.register_rule(Swish3)
    class Swish3Rule(initscope.Rule):
        def forward(self, ctx, x):
            return x.with_()

        def backward(self, ctx, grad):
            return {ctx.args[0]: grad}

    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), Swish3(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        p = initscope.plan(model, "xavier", input_shape=(3, 8, 8))
        assert len(p.layers) == 2
    finally:
        initscope.unregister_rule(Swish3)


def test_plan_mismatch_writes_nothing():
    p = initscope.plan(_net(), "asv-forward", input_shape=(3, 8, 8))
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    before = _snapshot(other)
    with pytest.raises(PlanMismatchError, match="nothing was written"):
        p.apply(other)
    assert _unchanged(other, before)


def test_plan_changes_no_weight():
    model = _net()
    before = _snapshot(model)
    initscope.plan(model, "asv-backward-exact", input_shape=(3, 8, 8))
    assert _unchanged(model, before)
    assert model.training  # modes restored after tracing
