"""Plans remembered by architecture (initscope.plan_cache): a hit is the plan planning would give."""

import dataclasses

import pytest
import torch
from torch import nn

import initscope
from initscope.models import create_model


@pytest.fixture(autouse=True)
def fresh_cache():
    initscope.clear_plan_cache()
    yield
    initscope.clear_plan_cache()


def _same(a: initscope.InitPlan, b: initscope.InitPlan) -> None:
    assert a.layers == b.layers
    assert a.norm_scales == b.norm_scales
    assert (a.method, a.options, a.input_shape, a.residual, a.notes) == (b.method, b.options, b.input_shape, b.residual, b.notes)


def _small_net(stride: int = 1, eps: float = 1e-5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=1), nn.BatchNorm2d(8, eps=eps), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("name, method", [("resnet18", "asv-backward"), ("plain34", "asv-forward-exact"),
                                          ("mobilenet_v2", "kaiming-forward")])
def test_a_hit_is_the_plan_recomputed(name, method):
    model = create_model(name, width=8, num_classes=10)
    first = initscope.plan(model, method, input_shape=(3, 32, 32))
    again = initscope.plan(model, method, input_shape=(3, 32, 32))
    assert initscope.cache_info().hits == 1
    _same(again, first)
    _same(again, initscope.plan(model, method, input_shape=(3, 32, 32), cache=False))


def test_another_instance_of_the_same_network_hits():
    initscope.plan(create_model("resnet18", width=8), "asv-backward", input_shape=(3, 32, 32))
    initscope.init_(create_model("resnet18", width=8), "asv-backward", input_shape=(3, 32, 32))
    assert initscope.cache_info().hits == 1


@pytest.mark.parametrize("change", ["stride", "eps", "bn_weight", "shape", "method", "option", "forward"])
def test_anything_the_plan_reads_makes_a_new_key(change):
    base = _small_net()
    p0 = initscope.plan(base, "asv-forward", input_shape=(3, 16, 16))
    model, method, shape, options = _small_net(), "asv-forward", (3, 16, 16), {}
    if change == "stride":
        model = _small_net(stride=2)
    elif change == "eps":
        model = _small_net(eps=0.5)
    elif change == "bn_weight":
        with torch.no_grad():
            model[1].weight[3] = 2.0
    elif change == "shape":
        shape = (3, 12, 12)
    elif change == "method":
        method = "asv-backward"
    elif change == "option":
        options = {"max_std_ratio": None}
    elif change == "forward":
        # Same modules, another forward: the traced graph differs.
        class Skip(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = _small_net()

            def forward(self, x):
                h = self.body[2](self.body[1](self.body[0](x)))
                return self.body[7](self.body[6](self.body[5](self.body[4](self.body[3](h) + h))))

        model = Skip()
    p1 = initscope.plan(model, method, input_shape=shape, **options)
    assert initscope.cache_info().hits == 0
    _same(p1, initscope.plan(model, method, input_shape=shape, cache=False, **options))
    assert p1.layers != p0.layers or p1.options != p0.options or p1.input_shape != p0.input_shape


def test_drawn_weights_do_not_enter_the_key():
    model = _small_net()
    initscope.init_(model, "asv-backward", input_shape=(3, 16, 16))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # a conv's weights: what a plan overwrites
    initscope.init_(model, "asv-backward", input_shape=(3, 16, 16))
    assert initscope.cache_info().hits == 1


def test_changing_the_returned_plan_does_not_change_the_cache():
    model = _small_net()
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, 16, 16))
    p.layers[0] = dataclasses.replace(p.layers[0], std=123.0)
    p.notes.append("mine")
    q = initscope.plan(model, "kaiming-forward", input_shape=(3, 16, 16))
    assert q.layers[0].std != 123.0 and "mine" not in q.notes


def test_custom_rules_and_example_inputs_are_not_cached():
    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    @initscope.register_rule(Twice)
    class TwiceRule(initscope.Rule):
        def forward(self, ctx, x):
            return x.scaled(4.0)

        def backward(self, ctx, grad):
            return {ctx.args[0]: grad.scaled(4.0)}

    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), Twice(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
        for _ in range(2):
            initscope.plan(model, "asv-forward", input_shape=(3, 16, 16))
        assert initscope.cache_info().hits == 0 and initscope.cache_info().uncacheable == 2
    finally:
        initscope.unregister_rule(Twice)
    model = _small_net()
    x = torch.randn(8, 3, 16, 16)
    for _ in range(2):
        initscope.plan(model, "asv-forward", example_input=x)
    assert initscope.cache_info().hits == 0


def test_registering_a_rule_empties_the_cache():
    model = _small_net()
    initscope.plan(model, "xavier", input_shape=(3, 16, 16))
    assert initscope.cache_info().size == 1

    class Unused(nn.Module):
        pass

    @initscope.register_rule(Unused)
    class UnusedRule(initscope.Rule):
        pass

    try:
        initscope.plan(model, "xavier", input_shape=(3, 16, 16))
        assert initscope.cache_info().hits == 0
    finally:
        initscope.unregister_rule(Unused)


def test_shared_parameters_are_part_of_the_key():
    # Two convs with weights of the same shapes, and the same two convs holding one Parameter, trace
    # to the same graph; the second is one weight with one std, so it must not find the first's plan.
    def net(shared: bool) -> nn.Module:
        m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
        if shared:
            m[3].weight = m[0].weight
        return m

    initscope.clear_plan_cache()
    apart = initscope.plan(net(False), "asv-forward", input_shape=(4, 8, 8))
    together = initscope.plan(net(True), "asv-forward", input_shape=(4, 8, 8))
    assert len(apart.layers) == 2 and len(together.layers) == 1
    assert initscope.cache_info().hits == 0
