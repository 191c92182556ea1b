"""Transformers and timm's CNNs plan and apply under every method (issue 17, item 3).

torchvision's ViT-B/16, Swin-T and MaxViT-T; timm's ViT-Tiny, DeiT-Tiny, NF-ResNet-50 (weight-
standardized convs), ResNeSt-14d (split attention: a softmax over radix groups and a sum),
ConvNeXt-Tiny and EfficientNet-B0, with random weights (nothing is downloaded). timm is the optional
extra ``timm`` (installed by ``make test``).
"""

import math

import pytest
import torch

import initscope

TORCHVISION = {"vit_b_16": (dict(image_size=32), 32), "swin_t": ({}, 64), "maxvit_t": ({}, 224)}
TIMM = {"vit_tiny_patch16_224": (dict(img_size=32), 32), "deit_tiny_patch16_224": (dict(img_size=32), 32),
        "nf_resnet50": ({}, 32), "resnest14d": ({}, 32), "convnext_tiny": ({}, 32), "efficientnet_b0": ({}, 32)}


def _every_method(model, size):
    shape = (3, size, size)
    batch = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    for name, m in initscope.METHODS.items():
        data = {"example_input": batch} if m.needs_data else {"input_shape": shape}
        p = initscope.init_(model, name, generator=torch.Generator().manual_seed(0), **data)
        assert p.layers, name
        for layer in p.layers:
            assert math.isfinite(layer.std) and layer.std >= 0, (name, layer.name)
            assert math.isfinite(layer.pred_out_var) and layer.pred_out_var >= 0, (name, layer.name)
            assert math.isfinite(layer.pred_in_grad_var) and layer.pred_in_grad_var >= 0, (name, layer.name)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_transformers_plan_and_apply_every_method(name, one_thread):
    from torchvision import models

    kwargs, size = TORCHVISION[name]
    model = models.get_model(name, weights=None, **kwargs)
    p = _every_method(model, size)
    paths = {l.weight_path for l in p.layers}
    # Every Linear is planned, and so are nn.MultiheadAttention's in_proj_weight and Swin's qkv/proj.
    linears = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears <= paths, sorted(linears - paths)[:5]
    if name == "vit_b_16":
        assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in paths


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_models_plan_and_apply_every_method(name, one_thread):
    timm = pytest.importorskip("timm")
    kwargs, size = TIMM[name]
    model = timm.create_model(name, pretrained=False, **kwargs)
    p = _every_method(model, size)
    weights = {f"{n}.weight" for n, mod in model.named_modules()
               if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    assert weights <= {l.weight_path for l in p.layers}


@pytest.mark.parametrize("cls", ["StdConv2d", "ScaledStdConv2d"])
def test_weight_standardized_conv_ignores_the_planned_std(cls):
    # timm's (Scaled)StdConv2d standardizes its weight in the forward pass: the planned std is written to
    # the parameter, and the prediction is the conv's with variance 1 or (gain·γ)²/fan_in whatever it is.
    # Each output channel's weights then sum to zero, so a ReLU's mean (1/π of its second moment) never
    # reaches the next conv's output: it was predicted 0.5 bits high until the rule centred its input.
    timm = pytest.importorskip("timm")
    from timm import layers

    from initscope.measure import measure

    conv = getattr(layers, cls)
    model = torch.nn.Sequential(conv(3, 32, 3, padding=1), torch.nn.ReLU(), conv(32, 32, 3, padding=1),
                                torch.nn.ReLU(), conv(32, 16, 3, padding=1))
    p = initscope.plan(model, "asv-forward", input_shape=(3, 12, 12), cache=False)
    me = measure(model, p, (3, 12, 12), batch=16, draws=8, seed=0)
    for layer in p.layers:
        assert abs(math.log2(me.out_var[layer.name] / layer.pred_out_var)) < 0.2, layer.name
        assert abs(math.log2(me.in_grad_var[layer.name] / layer.pred_in_grad_var)) < 0.2, layer.name
