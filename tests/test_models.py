"""The model registry: every model runs on small images, norm/head options, layer counts, duplicates."""

import pytest
import torch
import torchvision
from torch import nn

from initscope import models
from initscope.models import create, create_model, list_models, register_model

OWN = ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "plain34", "plain50", "resnet110", "resnet18",
       "resnet18-nobn", "resnet20", "resnet34", "resnet50", "resnet56"]
BEYOND_CNN = ["unet_like", "vit_tiny_like"]  # their own arguments (tests/test_attention.py)


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_listing():
    assert list_models() == sorted(OWN + BEYOND_CNN)
    assert create("vit_tiny_like", depth=2)(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert create("unet_like", width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert list_models("resnet*") == ["resnet110", "resnet18", "resnet18-nobn", "resnet20", "resnet34", "resnet50",
                                      "resnet56"]
    assert create is create_model


def test_duplicate_names_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("plain34")(lambda **kw: nn.Identity())
    assert models.create("plain34", width=4).__class__ is nn.Sequential  # the original is kept


@pytest.mark.parametrize("name", OWN)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_runs_on_small_images(name, shape):
    kw = {} if name == "resnet18-nobn" else {"norm": "none"}
    for extra in [kw, {**kw, "head": "paper"}]:
        model = create(name, width=8, in_channels=shape[0], num_classes=7, **extra).eval()
        with torch.no_grad():
            out = model(torch.randn(2, *shape))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small"])
def test_norm_none_removes_every_batchnorm(name):
    with_bn = create(name, width=8, num_classes=10)
    without = create(name, width=8, num_classes=10, norm="none", head="paper")
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in with_bn.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without.modules())
    assert len(_weights(with_bn)) + 1 == len(_weights(without))  # the paper head adds one linear layer


@pytest.mark.parametrize("name", ["plain34", "resnet18", "mobilenet_v2", "mobilenet_v3_small"])
def test_paper_head(name):
    model = create(name, width=8, num_classes=5, head="paper")
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 4
            and isinstance(m[0], nn.Linear) and m[0].out_features == 256]
    assert len(head) == 1
    lin, bn, relu, fc = head[0]
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 256 and isinstance(relu, nn.ReLU)
    assert fc is fcs[-1] and (fc.in_features, fc.out_features) == (256, 5)


def test_plain_nets_layer_counts_and_no_shortcuts():
    for name, depth, n_params in [("plain34", 34, 21_100_746), ("plain50", 50, 20_706_506)]:
        model = create(name, width=64, in_channels=3, num_classes=10)
        assert isinstance(model, nn.Sequential)  # one chain: no shortcut can exist
        assert len(_weights(model)) == depth
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert sum(p.numel() for p in model.parameters()) == n_params
    # plain50: bottlenecks 1x1 -> 3x3 -> 1x1 with a 4x expansion
    convs = [m for m in create("plain50", width=8) if isinstance(m, nn.Conv2d)][1:]
    assert [c.kernel_size for c in convs[:3]] == [(1, 1), (3, 3), (1, 1)]
    assert (convs[0].out_channels, convs[2].out_channels) == (8, 32)
    # the poster's 2.11e7 parameters at width 64
    assert 21_100_746 == pytest.approx(2.11e7, rel=0.002)


def test_mobilenet_v1_is_28_layers_with_13_depthwise():
    model = create("mobilenet_v1")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(_weights(model)) == 28
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    # Howard et al. 2017, Table 8: 4.2 million parameters at width 1.0 (1000 classes)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.2e6, rel=0.02)
    half = create("mobilenet_v1", width=16)
    assert half.features[0][0].out_channels == 16 and half.classifier.in_features == 512


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnets_match_torchvision_at_width_64(name):
    ours = create(name).state_dict()
    theirs = getattr(torchvision.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_width_and_in_channels():
    assert create("resnet18", width=16, in_channels=1).conv1.weight.shape == (16, 1, 7, 7)
    assert create("mobilenet_v2", width=16, in_channels=1).features[0][0].weight.shape == (16, 1, 3, 3)
    assert create("mobilenet_v3_small", width=8, in_channels=1).features[0][0].weight.shape == (8, 1, 3, 3)


def test_bad_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid: default, none"):
        create("resnet18", norm="group")
    with pytest.raises(ValueError, match="valid: default, paper"):
        create("mobilenet_v2", head="big")
    with pytest.raises(ValueError, match="width"):
        create("mobilenet_v2", width=16, width_mult=0.5)
    with pytest.raises(ValueError, match="unknown model"):
        create("no-such-net")
