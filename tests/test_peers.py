"""The peers beside the papers' methods: LSUV (data-dependent) and Fixup (residual nets without
normalization), checked against what each paper prescribes."""

import math

import pytest
import torch
from torch import nn

import initscope
from initscope.methods.fixup import fixup_scale
from initscope.models import create_model


def _variances(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, float]:
    out, hooks = {}, []
    for name in names:
        module = model.get_submodule(name)

        def keep(m, args, output, name=name):
            out.setdefault(name, float(output.detach().double().var()))  # returns None: the output stays

        hooks.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("name", ["plain34", "resnet18"])
def test_lsuv_sets_every_layer_to_unit_variance_on_its_batch(name):
    model = create_model(name, width=8, num_classes=10)
    x = torch.rand(32, 3, 32, 32) * 2 - 1  # images in [-1, 1], not unit Gaussians
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = initscope.init_(model, "lsuv", example_input=x, generator=torch.Generator().manual_seed(0))
    assert any("example batch" in n for n in p.notes)
    # BatchNorm's running statistics are the model's own: LSUV ran on copies of the buffers.
    for k, v in model.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, before[k]), k
    var = _variances(model, x, [l.name for l in p.layers])
    for layer in p.layers:
        assert abs(var[layer.name] - 1.0) < 0.1, (layer.name, var[layer.name])


def test_lsuv_needs_its_batch_and_writes_nothing_when_it_fails():
    model = create_model("plain34", width=4, num_classes=10)
    with pytest.raises(ValueError, match="example_input"):
        initscope.plan(model, "lsuv", input_shape=(3, 32, 32))
    p = initscope.plan(model, "lsuv", example_input=torch.randn(8, 3, 32, 32))
    p.example = torch.zeros(8, 3, 32, 32)  # a batch on which the first layer's output has no variance
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="output variance 0.0.*nothing was written"):
        p.apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, depth", [("resnet18-nobn", 2), ("resnet50", 3)])
def test_fixup_zeroes_branch_ends_and_the_classifier_and_scales_the_rest(name, depth):
    kwargs = {"norm": "none"} if name == "resnet50" else {}
    model = create_model(name, width=16, num_classes=10, **kwargs)
    p = initscope.init_(model, "fixup", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(0))
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    scale = fixup_scale(len(blocks), depth)
    assert scale == pytest.approx(len(blocks) ** (-1 / (2 * depth - 2)))
    last = "conv2" if depth == 2 else "conv3"
    for layer in p.layers:
        w = model.get_parameter(layer.weight_path).detach()
        fan_in = w[0].numel()
        if layer.name.endswith(last) or layer.name == "fc":
            assert layer.std == 0.0 and float(w.abs().max()) == 0.0, layer.name
        elif ".conv" in layer.name:
            assert layer.std == pytest.approx(math.sqrt(2 / fan_in) * scale, rel=1e-12), layer.name
        else:  # the stem and the downsampling shortcuts: Kaiming fan_in
            assert layer.std == pytest.approx(math.sqrt(2 / fan_in), rel=1e-12), layer.name
    # Every block is the identity: the logits are zero, whatever the input.
    with torch.no_grad():
        assert float(model(torch.randn(4, 3, 32, 32)).abs().max()) == 0.0
    assert any("classifier starts at zero" in n for n in p.notes)
