"""The torchvision zoo plans and applies under every method."""

import math

import pytest
import torch
from torch import nn

import initscope
from initscope.models import create_model

ZOO = ["resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny", "resnet18-nobn"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_plans_and_applies_every_method(name):
    model = create_model(name)
    n_weight = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for method, m in initscope.METHODS.items():
        gen = torch.Generator().manual_seed(0)
        # A method that sets its stds on data gets a batch; the others plan from the shape.
        data = {"example_input": torch.randn(4, 3, 64, 64)} if m.needs_data else {"input_shape": (3, 64, 64)}
        p = initscope.init_(model, method, generator=gen, **data)
        assert len(p.layers) == n_weight, method
        for layer in p.layers:
            assert math.isfinite(layer.std) and layer.std >= 0, (method, layer.name)
            assert layer.pred_out_var >= 0 and layer.pred_in_grad_var >= 0, (method, layer.name)
            w = model.get_parameter(layer.weight_path)
            if m.distribution != "orthogonal" and not m.fixed_distribution and not m.adjusts and layer.std > 0 \
                    and w.numel() > 1000:
                assert float(w.detach().std()) == pytest.approx(layer.std, rel=0.1), (method, layer.name)


# One of each family of torchvision's other CNNs: each brings ops or layouts the six above do not
# (inception branches, fire modules, grouped bottlenecks with SE, channel shuffles, max-pool stems with
# ceil_mode, plain VGG stacks). The transformers (ViT, Swin, MaxViT) stop at their attention with an
# UnknownOpError that names the module.
MORE = ["googlenet", "inception_v3", "squeezenet1_1", "regnet_y_400mf", "resnext50_32x4d", "mnasnet0_5",
        "mobilenet_v3_small", "shufflenet_v2_x0_5", "vgg11_bn", "alexnet"]


@pytest.mark.parametrize("name", MORE)
def test_the_rest_of_the_cnn_zoo_plans(name):
    from torchvision import models

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = models.get_model(name, weights=None, **kwargs)
    size = 75 if name == "inception_v3" else 64
    p = initscope.plan(model, "asv-backward", input_shape=(3, size, size), cache=False)
    assert len(p.layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for layer in p.layers:
        assert math.isfinite(layer.std) and layer.std > 0, layer.name
        assert layer.pred_out_var > 0 and layer.pred_in_grad_var > 0, layer.name


def test_ops_with_several_outputs_send_their_gradients_back():
    # ShuffleNetV2 splits its input with ``x.chunk(2, dim=1)``: the backward pass hands the chunk one
    # gradient per output (None where none arrived), and the finite-width bookkeeping read it as a
    # single Grad ('list' object has no attribute 'logvar').
    from torchvision.models import shufflenet_v2_x0_5

    model = shufflenet_v2_x0_5()
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, 32, 32), cache=False)
    assert len(p.layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert all(math.isfinite(layer.pred_in_grad_var) and layer.pred_in_grad_var > 0 for layer in p.layers)


def test_depthwise_fans_true_vs_framework():
    # pytorch/pytorch#23854: torch.nn.init takes fan_out = C k² for a depthwise (C, 1, k, k) weight.
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    model = nn.Sequential(conv, nn.ReLU())
    true = initscope.plan(model, "kaiming-backward", input_shape=(32, 8, 8)).layers[0]
    framework = initscope.plan(model, "kaiming-backward", input_shape=(32, 8, 8), fan="framework").layers[0]
    assert (true.fan_in, true.fan_out) == (9, 9)
    assert (framework.fan_in, framework.fan_out) == (9, 32 * 9)
    assert true.std == pytest.approx(math.sqrt(2 / 9))
    assert framework.std == pytest.approx(math.sqrt(2 / (32 * 9)))
    ref = torch.empty_like(conv.weight)
    assert nn.init._calculate_fan_in_and_fan_out(ref) == (framework.fan_in, framework.fan_out)


def test_apply_draws_the_planned_distribution():
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    for dist in ["normal", "uniform", "truncated_normal"]:
        p = initscope.init_(model, "kaiming-forward", input_shape=(16, 12, 12), distribution=dist,
                            generator=torch.Generator().manual_seed(1))
        w = model[2].weight.detach()
        assert float(w.std()) == pytest.approx(p.layers[1].std, rel=0.03), dist
        if dist == "truncated_normal":
            assert float(w.abs().max()) <= 2 * p.layers[1].std / 0.8796 + 1e-6
        assert float(model[2].bias.detach().abs().max()) == 0.0


def test_generator_makes_draws_reproducible():
    a, b = create_model("plain34", width=8), create_model("plain34", width=8)
    initscope.init_(a, "asv-forward", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(3))
    initscope.init_(b, "asv-forward", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_table_and_dict():
    p = initscope.plan(create_model("plain34", width=8), "asv-backward", input_shape=(3, 32, 32))
    text = p.to_table()
    assert "pred_grad" in text and len(text.splitlines()) == len(p.layers) + 2
    d = p.to_dict()
    assert d["method"] == "asv-backward" and len(d["layers"]) == 34
    assert {"name", "kind", "std", "fan_in", "fan_out", "eps", "tau_in", "gamma", "clamped",
            "pred_out_var", "pred_in_grad_var"} <= set(d["layers"][0])
    __import__("json").dumps(d)


def test_norm_knobs_are_planned_as_written_so_planning_is_idempotent():
    # The scale policy writes each branch's last BatchNorm weight (and zeroes its bias). A second
    # init_ used to plan from the weight the first one wrote and undo it (0.48 -> 1.0 -> 0.48).
    from torchvision.models import resnet18

    model = resnet18()
    first = initscope.init_(model, "asv-backward", input_shape=(3, 32, 32))
    assert first.norm_scales and any(abs(a - 1.0) > 0.1 for a in first.norm_scales.values())
    second = initscope.init_(model, "asv-backward", input_shape=(3, 32, 32))
    assert second.norm_scales == pytest.approx(first.norm_scales, rel=1e-9)
    assert [l.std for l in second.layers] == pytest.approx([l.std for l in first.layers], rel=1e-9)

    # Whatever a knob holds (a trained model), the plan is the fresh model's.
    def every_norm_at(gamma: float, beta: float) -> nn.Module:
        net = resnet18()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.fill_(gamma)
                    m.bias.fill_(beta)
        return net

    trained, fresh = every_norm_at(0.3, 0.2), every_norm_at(0.3, 0.2)
    with torch.no_grad():
        for name in first.norm_scales:
            fresh.get_submodule(name).weight.fill_(1.0)
            fresh.get_submodule(name).bias.zero_()
    a = initscope.plan(trained, "asv-backward", input_shape=(3, 32, 32))
    b = initscope.plan(fresh, "asv-backward", input_shape=(3, 32, 32))
    assert a.norm_scales == pytest.approx(b.norm_scales, rel=1e-9)
    assert [l.pred_out_var for l in a.layers] == pytest.approx([l.pred_out_var for l in b.layers], rel=1e-9)
