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


@pytest.mark.parametrize("depth, blocks", [(20, 9), (56, 27)])
def test_fixup_on_cifar_resnets_with_its_scalars(depth, blocks):
    # Fixup's own architecture: scalar biases before each conv and activation, a multiplier at each
    # branch's end; the branch's last conv is zeroed through them, the rest scaled by L^(-1/2).
    model = create_model(f"resnet{depth}", norm="none", fixup_scalars=True, num_classes=10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6 * (depth - 2) // 6 + 1
    p = initscope.init_(model, "fixup", input_shape=(3, 32, 32))
    scale = blocks ** -0.5
    for layer in p.layers:
        fan_in = model.get_parameter(layer.weight_path)[0].numel()
        if layer.name.endswith("conv2") or layer.name == "fc":
            assert layer.std == 0.0, layer.name
        elif layer.name.endswith("conv1") and "." in layer.name:
            assert layer.std == pytest.approx(math.sqrt(2 / fan_in) * scale, rel=1e-12), layer.name
    scalars = [p for n, p in model.named_parameters() if n.endswith(".value")]
    assert len(scalars) == 5 * blocks + 1 and all(float(s) in (0.0, 1.0) for s in scalars)
    with torch.no_grad():
        assert float(model(torch.randn(2, 3, 32, 32)).abs().max()) == 0.0
