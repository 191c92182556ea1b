"""Normalizations in eval mode (issue 16, item 2): what a BatchNorm dividing by its running statistics
does, against Monte Carlo; plans that keep their stds whatever the mode; probes that predict for the
mode the model is in. ``docs/theory.md`` ("Normalization in eval mode") has the numbers.

The settings follow BackPACK's tests: a module, what is done to it, a bound, a readable id; each is
planned in eval mode and measured in eval mode over weight draws (geometric mean, as a prediction for
a typical draw is held to).
"""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from mc_nets import Sandwich
from torch import nn

import initscope
from initscope.measure import measure

pytestmark = pytest.mark.usefixtures("one_thread")

C = 32
SIZE = 12


def Wrap(op: nn.Module) -> Sandwich:  # noqa: N802 - reads as the class it builds
    """A conv, the op, a conv: the op's forward is read at ``b``'s output, its backward at ``a``'s input."""
    return Sandwich(op, C)


class FunctionalBatchNorm(nn.Module):
    """A BatchNorm written with ``F.batch_norm(..., self.training, ...)``: the trace bakes in False."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


def loaded(model: nn.Module, seed: int, *, mean: bool = True, affine: bool = True) -> nn.Module:
    """``model`` with running statistics (and affine parameters) as a checkpoint might hold them:
    variances in [0.2, 2], means in [-1, 1], γ in [0.25, 1.75], β ~ N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is None:
                continue
            n = m.running_var.numel()
            m.running_var.copy_(torch.rand(n, generator=g) * 1.8 + 0.2)
            if mean:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if affine:
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def conv_bn_relu_stack() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU()]
    for _ in range(2):
        layers += [nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 10))


# (make the model, bound in bits, id). Where the per-channel maps shift (a mean or β), the activation
# after the norm reads one pooled marginal: each channel's active fraction is averaged, which loses its
# correlation with the channel's factor a_c² (docs/theory.md: 0.03-0.18 bits per norm for these
# random statistics), hence the wider bound. Everything else is exact up to Monte Carlo noise.
SETTINGS = [
    (lambda: Wrap(nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())), 0.12, "batchnorm-initial-statistics"),
    (lambda: loaded(Wrap(nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())), 1, mean=False, affine=False), 0.12,
     "batchnorm-per-channel-scale"),
    (lambda: loaded(Wrap(nn.Sequential(nn.BatchNorm2d(C), nn.SiLU())), 1, mean=False, affine=False), 0.12,
     "batchnorm-per-channel-scale-silu"),
    (lambda: loaded(Wrap(nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())), 2), 0.25, "batchnorm-loaded"),
    (lambda: loaded(Wrap(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(C))), 3), 0.25, "relu-then-batchnorm-loaded"),
    (lambda: loaded(Wrap(nn.Sequential(nn.InstanceNorm2d(C, affine=True, track_running_stats=True), nn.ReLU())), 4),
     0.25, "instancenorm-tracking-loaded"),
    (lambda: loaded(Wrap(nn.Sequential(FunctionalBatchNorm(), nn.ReLU())), 5), 0.25, "functional-batch-norm-loaded"),
]


@pytest.mark.parametrize("make, bound", [s[:2] for s in SETTINGS], ids=[s[2] for s in SETTINGS])
def test_eval_norm_matches_monte_carlo(make, bound):
    torch.manual_seed(0)
    model = make().eval()
    shape = (3, SIZE, SIZE)
    p = initscope.plan(model, "kaiming-forward", input_shape=shape, cache=False)
    me = measure(model, p, shape, batch=16, draws=16, seed=0)
    for layer in p.layers:
        gap_f = math.log2(me.out_var[layer.name] / layer.pred_out_var)
        gap_b = math.log2(me.in_grad_var[layer.name] / layer.pred_in_grad_var)
        assert abs(gap_f) < bound, f"forward at {layer.name} off by 2^{gap_f:+.3f}"
        assert abs(gap_b) < bound, f"gradient at {layer.name} off by 2^{gap_b:+.3f}"


def test_loaded_statistics_on_a_stack_match_monte_carlo():
    # Three Conv-BN-ReLU blocks with loaded running statistics against the same stack at PyTorch's
    # initial ones, which in eval mode is a plain conv/ReLU chain (its own gaps, +0.42 bits at the first
    # layer's input gradient, are the chain's, not the norms'): what the loaded statistics move is
    # predicted, channel for channel, within the documented per-norm bound.
    shape = (3, SIZE, SIZE)

    def gaps(model):
        model = model.eval()
        p = initscope.plan(model, "kaiming-forward", input_shape=shape, cache=False)
        me = measure(model, p, shape, batch=16, draws=16, seed=0)
        return p, {layer.name: (math.log2(me.out_var[layer.name] / layer.pred_out_var),
                                math.log2(me.in_grad_var[layer.name] / layer.pred_in_grad_var)) for layer in p.layers}

    torch.manual_seed(0)
    p_loaded, with_stats = gaps(loaded(conv_bn_relu_stack(), 6))
    torch.manual_seed(0)
    p_initial, initial = gaps(conv_bn_relu_stack())
    # The loaded statistics move the predictions by bits, so agreeing below is no accident.
    moved = max(abs(math.log2(a.pred_out_var / b.pred_out_var)) for a, b in zip(p_loaded.layers, p_initial.layers))
    assert moved > 0.5
    for name, (fwd, bwd) in with_stats.items():
        assert abs(fwd - initial[name][0]) < 0.35, f"forward at {name}: 2^{fwd:+.3f}, initial statistics 2^{initial[name][0]:+.3f}"
        assert abs(bwd - initial[name][1]) < 0.35, f"gradient at {name}: 2^{bwd:+.3f}, initial statistics 2^{initial[name][1]:+.3f}"


# -- planning: the stds are for training --------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """BatchNorm with running statistics, one without, residual knobs and a dropout before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.free = nn.BatchNorm2d(16, track_running_stats=False)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.free(self.stem(x)))))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


@pytest.mark.parametrize("method", ["kaiming-forward", "asv-backward", "asv-forward-exact", "asv-backward-exact"])
def test_a_model_in_eval_mode_is_planned_for_training(method):
    model = SmallResNet()
    shape = (3, 8, 8)
    trained = initscope.plan(model.train(), method, input_shape=shape, cache=False)
    evaluated = initscope.plan(model.eval(), method, input_shape=shape, cache=False)
    # The same stds, residual factors and normalization writes: an initialization is for training
    # (the exact variants chose theirs with the dropout off and BatchNorm on running statistics).
    assert [l.std for l in evaluated.layers] == [l.std for l in trained.layers]
    assert evaluated.norm_scales == trained.norm_scales and evaluated.residual == trained.residual
    # One note says so; the predictions are eval mode's.
    added = [n for n in evaluated.notes if n not in trained.notes]
    assert len(added) == 1 and added[0].startswith("planned for training") and "eval mode" in added[0]
    assert len(evaluated.notes) == len(trained.notes) + 1
    assert "5 normalization(s)" in added[0] and "1 dropout" in added[0]
    assert max(abs(math.log2(e.pred_out_var / t.pred_out_var)) for e, t in zip(evaluated.layers, trained.layers)) > 0.2
    # The modes recorded are those of the ops whose work depends on them: not the BatchNorm that keeps
    # no running statistics (it normalizes by the batch in both modes).
    assert set(evaluated.modes) == {"bn", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "drop"}
    assert not any(evaluated.modes.values()) and all(trained.modes.values())
    assert evaluated.to_dict()["modes"] == evaluated.modes


def test_batchnorm_without_running_statistics_normalizes_in_eval_mode():
    def net(track: bool) -> Wrap:
        return Wrap(nn.Sequential(nn.BatchNorm2d(C, track_running_stats=track), nn.ReLU()))

    shape = (3, SIZE, SIZE)
    free = net(False)
    assert initscope.plan(free.eval(), "kaiming-forward", input_shape=shape, cache=False)["b"].pred_out_var == \
        initscope.plan(free.train(), "kaiming-forward", input_shape=shape, cache=False)["b"].pred_out_var
    assert initscope.plan(free.eval(), "kaiming-forward", input_shape=shape, cache=False).modes == {}
    tracked = net(True)
    eval_pred = initscope.plan(tracked.eval(), "kaiming-forward", input_shape=shape, cache=False)["b"].pred_out_var
    train_pred = initscope.plan(tracked.train(), "kaiming-forward", input_shape=shape, cache=False)["b"].pred_out_var
    # In eval mode the initial running statistics (0, 1) leave the conv's E[u²] ≈ 1.8 unnormalized.
    assert math.log2(eval_pred / train_pred) > 0.5


# -- probing: the predictions follow the mode -----------------------------------------------------------------


def _predictions(result) -> list[tuple[float, float]]:
    return [(l.pred_out_var, l.pred_in_grad_var) for l in result.layers]


def _planned(plan) -> list[tuple[float, float]]:
    return [(l.pred_out_var, l.pred_in_grad_var) for l in plan.layers]


def test_probe_follows_the_mode_the_model_is_in():
    model = SmallResNet()
    shape = (3, 8, 8)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    initscope.init_(model.eval(), "asv-backward", input_shape=shape, generator=torch.Generator().manual_seed(0))
    in_eval = initscope.plan(model.eval(), "asv-backward", input_shape=shape)
    in_train = initscope.plan(model.train(), "asv-backward", input_shape=shape)
    assert _planned(in_eval) != _planned(in_train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # planned with the same stds: nothing to warn about
        assert _predictions(initscope.probe(model.train(), x, quantiles=False, histograms=False)) == _planned(in_train)
        assert _predictions(initscope.probe(model.eval(), x, quantiles=False, histograms=False)) == _planned(in_eval)
        model.train()
        model.blocks.eval()  # mixed modes: predicted as they are
        mixed = initscope.plan(model, "asv-backward", input_shape=shape)
        assert _predictions(initscope.probe(model, x, quantiles=False, histograms=False)) == _planned(mixed)
    assert _planned(mixed) not in (_planned(in_eval), _planned(in_train))
    assert model.training and not model.blocks.training and model.blocks[0].bn1.training is False  # left as it was


def test_a_plan_that_cannot_follow_the_mode_says_so():
    model = SmallResNet()
    shape = (3, 8, 8)
    p = initscope.init_(model, "kaiming-forward", input_shape=shape, generator=torch.Generator().manual_seed(0))
    # A plan that does not say what it was made from (its method unknown here) cannot be made again.
    orphan = dataclasses.replace(p, method="someone-elses-method", recipe=None)
    x = torch.randn(8, *shape)
    with pytest.warns(UserWarning, match=r"now in eval mode .*could not be made again.*compare different modes"):
        result = initscope.probe(model.eval(), x, plan=orphan, quantiles=False, histograms=False)
    assert _predictions(result) == _planned(p)


def test_a_plan_made_before_the_statistics_were_loaded_is_made_again_and_says_so():
    model = Wrap(nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()))
    shape = (3, SIZE, SIZE)
    p = initscope.init_(model, "asv-forward", input_shape=shape, generator=torch.Generator().manual_seed(0))
    loaded(model, 7)  # a checkpoint's normalization: asv-forward's τ now differs, and so do its stds
    x = torch.randn(8, *shape)
    with pytest.warns(UserWarning, match=r"stds differ from the given plan's at 1 layer\(s\) \(b\)"):
        result = initscope.probe(model.eval(), x, plan=p, quantiles=False, histograms=False)
    assert _predictions(result) == _planned(initscope.plan(model, "asv-forward", input_shape=shape))


# -- a BatchNorm CNN probed in eval mode (the repro) -----------------------------------------------------


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_batchnorm_cnn_probed_in_eval_mode_flags_nothing(source):
    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", num_classes=10)  # never pretrained: nothing is downloaded
    else:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
    shape = (3, 32, 32)
    initscope.init_(model, "kaiming-forward", input_shape=shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    result = initscope.probe(model, x, quantiles=False, histograms=False)
    # Before: every layer flagged (eval mode predicted as training's batch statistics).
    assert result.flagged == []
    assert _predictions(result) == _planned(initscope.plan(model, "kaiming-forward", input_shape=shape))


def test_resnet18_in_eval_mode_agrees_with_measurement():
    # The geometric mean over draws, as tests/test_agreement.py holds the train-mode nets to (2^0.75).
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    shape = (3, 32, 32)
    p = initscope.plan(model, "kaiming-forward", input_shape=shape)
    me = measure(model, p, shape, batch=16, draws=6, seed=0)
    fwd = {l.name: math.log2(me.out_var[l.name] / l.pred_out_var) for l in p.layers}
    bwd = {l.name: math.log2(me.in_grad_var[l.name] / l.pred_in_grad_var) for l in p.layers}
    worst_f, worst_b = max(fwd, key=lambda n: abs(fwd[n])), max(bwd, key=lambda n: abs(bwd[n]))
    assert abs(fwd[worst_f]) < 0.75, f"forward off by 2^{fwd[worst_f]:+.2f} at {worst_f}"
    assert abs(bwd[worst_b]) < 0.75, f"gradient off by 2^{bwd[worst_b]:+.2f} at {worst_b}"
    # Eval mode does not renormalize: the signal grows through the residual stages (~2^8 at the head
    # for kaiming-forward), which a train-mode prediction would put near 1.
    assert p["fc"].pred_out_var > 30
