"""Every rule against Monte Carlo: a conv, the op, a conv; prediction vs the mean over many draws."""

import math

import pytest
import torch
from mc_nets import Sandwich
from torch import nn

import initscope
from initscope.measure import measure

C = 24


def planned_and_measured(model, size: int, draws: int = 24, **options):
    """``kaiming-forward`` planned for a 3×size×size input, and measured over ``draws`` weight draws."""
    shape = (3, size, size)
    p = initscope.plan(model, "kaiming-forward", input_shape=shape, cache=False, **options)
    return p, measure(model, p, shape, batch=16, draws=draws, seed=0)


def assert_agrees(p, me, bound: float, *, forward=None, backward=None, what: str = "") -> None:
    """Measured over predicted second moments within 2^±bound: forward at the layers named in
    ``forward``, gradients at those in ``backward`` (every planned layer when None)."""
    every = [layer.name for layer in p.layers]
    for name in every if forward is None else forward:
        gap = math.log2(me.out_var[name] / p[name].pred_out_var)
        assert abs(gap) < bound, f"{what}forward at {name} off by 2^{gap:+.3f}"
    for name in every if backward is None else backward:
        gap = math.log2(me.in_grad_var[name] / p[name].pred_in_grad_var)
        assert abs(gap) < bound, f"{what}gradient at {name} off by 2^{gap:+.3f}"


def Wrap(op, c_mid=C):  # noqa: N802 - reads as the class it builds
    return Sandwich(op, C, c_mid)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.relu(x)
        return self.relu(y + self.conv(y))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 8, 1, bias=False)

    def forward(self, x):
        return torch.cat([torch.relu(x), self.conv(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(C, 8, 1)
        self.fc2 = nn.Conv2d(8, C, 1)

    def gate(self, x):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))

    def forward(self, x):
        x = torch.relu(x)
        return x * self.gate(x)


class GateFirst(SqueezeExcite):
    """A squeeze-excitation block written as torchvision's is: ``scale * input``, the gate first."""

    def forward(self, x):
        x = torch.relu(x)
        return self.gate(x) * x


def _stochastic_depth():
    from torchvision.ops import StochasticDepth

    return nn.Sequential(nn.ReLU(), StochasticDepth(0.3, "row"))


OPS = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "maxpool_overlap": lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
    "maxpool_2": lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),
    "maxpool_ceil": lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True)),
    "avgpool_overlap": lambda: nn.Sequential(nn.ReLU(), nn.AvgPool2d(3, 1, 1)),
    "avgpool_nopad_count": lambda: nn.Sequential(nn.ReLU(), nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    "adaptive_avg_3": lambda: nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(5)),
    "batchnorm": lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()),
    "groupnorm": lambda: nn.Sequential(nn.GroupNorm(4, C), nn.ReLU()),
    "layernorm": lambda: nn.Sequential(nn.LayerNorm([C, 12, 12]), nn.ReLU()),
    "depthwise": lambda: nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.ReLU()),
    "identity": lambda: nn.Identity(),
    "residual": lambda: Residual(),
    "squeeze_excite": lambda: SqueezeExcite(),
    "squeeze_excite_gate_first": lambda: GateFirst(),
    # Train mode, as constructed: the inverted scaling 1/(1 - p) is in both directions.
    "dropout": lambda: nn.Sequential(nn.ReLU(), nn.Dropout(0.3)),
    "dropout2d": lambda: nn.Sequential(nn.ReLU(), nn.Dropout2d(0.3)),
    "stochastic_depth": _stochastic_depth,
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_rule_matches_monte_carlo(op):
    model = Wrap(OPS[op]())
    p, me = planned_and_measured(model, 12)
    assert_agrees(p, me, 0.2, forward=("a", "b"), backward=("a", "b"), what=f"{op}: ")


def test_concat_matches_monte_carlo():
    model = Wrap(Concat(), c_mid=C + 8)
    p, me = planned_and_measured(model, 12)
    b = p["b"]
    assert abs(math.log2(me.out_var["b"] / b.pred_out_var)) < 0.2
    assert abs(math.log2(me.in_grad_var["b"] / b.pred_in_grad_var)) < 0.2


def test_linear_after_flatten_matches_monte_carlo():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.Tanh(), nn.Linear(64, 10))
    p = initscope.plan(model, "xavier", input_shape=(3, 8, 8))
    me = measure(model, p, (3, 8, 8), batch=16, draws=24, seed=0)
    for layer in p.layers:
        assert abs(math.log2(me.out_var[layer.name] / layer.pred_out_var)) < 0.2, layer.name
        assert abs(math.log2(me.in_grad_var[layer.name] / layer.pred_in_grad_var)) < 0.2, layer.name


@pytest.mark.parametrize("size, kernel, padding", [(2, 3, 1), (4, 3, 1), (3, 5, 2), (8, 3, 1)])
def test_batchnorm_removes_the_pooled_mean_share(size, kernel, padding, monkeypatch):
    # BatchNorm subtracts each channel's mean over samples and positions. After a conv on a small
    # padded map that mean is a smaller share of the second moment than the per-position one
    # (xcorr, 1/π for a ReLU input): each position's offset is made of other taps.
    from initscope.methods.job import Job

    # 2048 output channels and 6 draws: the share's draw-to-draw scatter (a square of one Gaussian per
    # channel) averages to ~1 %.
    c_in, c_out, batch = 64, 2048, 128
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False),
                          nn.BatchNorm2d(c_out), nn.ReLU(), nn.Conv2d(c_out, 4, 1, bias=False))
    seen = {}
    original = Job.run

    def keep(self, *args, **kwargs):
        seen["pass"] = original(self, *args, **kwargs)
        return seen["pass"]

    monkeypatch.setattr(Job, "run", keep)
    initscope.plan(model, "kaiming-forward", input_shape=(c_in, size, size), cache=False)
    conv = next(n for n in seen["pass"].r.traced.nodes if n.target == "1")
    predicted = seen["pass"].values[conv].shared.pooled
    g = torch.Generator().manual_seed(0)
    shares = []
    with torch.no_grad():
        for _ in range(6):
            nn.init.normal_(model[1].weight, generator=g)
            u = model[1](torch.relu(torch.randn(batch, c_in, size, size, generator=g)))
            shares.append(float((u.mean(dim=(0, 2, 3)) ** 2).mean() / (u**2).mean()))
    measured = sum(shares) / len(shares)
    # The batch mean also carries sampling noise of relative size ~1/(batch * positions), far below this.
    assert measured == pytest.approx(predicted, rel=0.03)
    if padding:
        assert predicted < 1 / math.pi - 0.01  # the border matters on these maps


def _relu_then_batchnorm_then_pool() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("size", [4, 8, 16])
def test_a_batchnorm_after_a_relu_never_removes_more_than_a_channel_mean_holds(size):
    # A BatchNorm subtracts each channel's mean over samples and positions, which is never more of the
    # second moment than one sample's mean over the positions holds (their variance across samples is
    # not negative). The ReLU's share and the map's correlation are computed apart, and on 4x4 and 8x8
    # maps the first came out above the second: fc's second moment was predicted negative (-0.075 and
    # -0.069). Clamped, it is positive; its size on small maps is the difference of two close shares,
    # each a few percent off (docs/theory.md, 'What is not closed': measured 0.142 and 0.036 against
    # 0.048 and 0.061). On 16x16 the two errors are alike and cancel.
    torch.manual_seed(0)
    model = _relu_then_batchnorm_then_pool().train()
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, size, size), cache=False)
    fc = p.layers[-1]
    assert fc.pred_out_var > 0
    if size == 16:
        me = measure(model, p, (3, size, size), batch=32, draws=8, seed=0)
        assert abs(math.log2(me.out_var[fc.name] / fc.pred_out_var)) < 0.15


@pytest.mark.parametrize("max_cov", [256, 16], ids=["covariance", "one-correlation"])
def test_gate_first_squeeze_excite_before_a_global_pool(max_cov):
    # ``s * x`` with a 1x1 gate s: the product must keep x's spatial covariance (the global pool after
    # it reads every pair of positions: the ReLU's mean alone is a third of its second moment), and the
    # gate's gradient Σ_p g_p x_p must keep the cross-position terms, which the pool's position-constant
    # gradient makes dominant. Read in the written order, the rule took the gate's statistics for the
    # map's: the head's forward was predicted 5.6 bits low and the SE layers' gradients 5.3 bits low.
    # On the 144-position map a covariance is kept at max_cov 256; at 16 both the map and the gradient
    # carry one average correlation instead (without one for the gradient the SE layers' gradients were
    # 5.3 bits low again, and the stem's 0.31 bits high).
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), GateFirst(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(C, 10))
    p, me = planned_and_measured(model, 12, max_cov_positions=max_cov)
    for layer in p.layers:
        gap_b = math.log2(me.in_grad_var[layer.name] / layer.pred_in_grad_var)
        assert abs(gap_b) < 0.3, f"gradient at {layer.name} off by 2^{gap_b:+.3f}"
    # Not fc1/fc2's forward: upstream of the product, whatever its order; an 8-channel layer on a 1x1 map
    # whose input every sample shares is the finite-width scatter's case (about -0.6 bits at 24 draws).
    for name in ("0", "4"):
        gap_f = math.log2(me.out_var[name] / p[name].pred_out_var)
        assert abs(gap_f) < 0.2, f"forward at {name} off by 2^{gap_f:+.3f}"


@pytest.mark.parametrize("train", [True, False])
def test_dropout_follows_the_module_mode(train):
    # In eval mode dropout is the identity; in train mode each second moment grows by 1/(1 - p).
    model = Wrap(nn.Sequential(nn.ReLU(), nn.Dropout(0.5)))
    model.train(train)
    p = initscope.plan(model, "kaiming-forward", input_shape=(3, 12, 12), cache=False)
    ratio = p["b"].pred_out_var / p["a"].pred_out_var
    # The same net with the identity in the dropout's place: b's output over a's, as eval mode gives it.
    eval_model = Wrap(nn.Sequential(nn.ReLU(), nn.Identity()))
    q = initscope.plan(eval_model, "kaiming-forward", input_shape=(3, 12, 12), cache=False)
    expected = q["b"].pred_out_var / q["a"].pred_out_var * (2.0 if train else 1.0)
    # Typical values: in train mode the channel offsets' share (xcorr) falls by 1 - p, and with it the
    # finite-width discount on b, so the ratio is 2 only to within that (0.5 % here).
    assert ratio == pytest.approx(expected, rel=0.02 if train else 1e-9)


class ConcatNorm(nn.Module):
    """A max-pooled ReLU map (mean share ~0.85) and a fresh conv output (~0) concatenated, then
    BatchNorm, ReLU and a conv: a DenseNet layer's input in miniature."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.side = nn.Conv2d(C, C, 1, bias=False)
        self.norm = nn.BatchNorm2d(2 * C)
        self.b = nn.Conv2d(2 * C, 16, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.a(x)
        y = torch.cat([self.pool(torch.relu(h)), self.side(h)], dim=1)
        return self.b(torch.relu(self.norm(y)))


def test_batchnorm_over_a_concatenation_normalizes_each_block():
    # The BatchNorm subtracts each channel's own mean: most of the pooled block's second moment, none
    # of the conv block's. One share and one recentred marginal for the whole concatenation put the
    # ReLU's output 0.54 bits low (b's forward) and side's gradient 0.17 bits low.
    model = ConcatNorm()
    p, me = planned_and_measured(model, 12, draws=16)
    assert_agrees(p, me, 0.15)


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list):
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class TinyDenseNet(nn.Module):
    """torchvision's DenseNet pattern: a max-pooled stem, then layers that each read the
    concatenation of everything before them, and a transition."""

    def __init__(self, stem: int = 16, growth: int = 8, layers: int = 4):
        super().__init__()
        self.conv0, self.norm0 = nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.pool0 = nn.MaxPool2d(3, 2, 1)
        self.layers = nn.ModuleList(_DenseLayer(stem + i * growth, growth) for i in range(layers))
        c = stem + layers * growth
        self.norm, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, 16, 1, bias=False)

    def forward(self, x):
        features = [self.pool0(torch.relu(self.norm0(self.conv0(x))))]
        for layer in self.layers:
            features.append(layer(features))
        return self.conv(torch.relu(self.norm(torch.cat(features, 1))))


def test_dense_block_matches_monte_carlo():
    # Each layer's gradient reaches the stem through every later layer's BatchNorm; with one mean
    # share per concatenation the errors compounded: gradients 1.0 to 4.4 bits too high, the conv1
    # layers' forward 0.3 bits low.
    model = TinyDenseNet()
    p, me = planned_and_measured(model, 16, draws=8)
    assert_agrees(p, me, 0.2)


class ShuffleHead(nn.Module):
    """ShuffleNetV2's channel split and shuffle, then the global mean and a classifier."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups
        self.a = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.b = nn.Conv2d(C // 2, C // 2, 3, padding=1, bias=False)
        # Wide, so that its second moment averages over many outputs: what is tested is its input.
        self.fc = nn.Linear(C, 256)

    def forward(self, x):
        x = torch.relu(self.a(x))
        keep, branch = x.chunk(2, dim=1)
        x = torch.cat((keep, torch.relu(self.b(branch))), dim=1)
        n, c, h, w = x.shape
        x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("max_cov", [64, 16], ids=["covariance", "one-correlation"])
def test_channel_shuffle_keeps_the_spatial_statistics(max_cov):
    # The shuffle's view to (N, g, C/g, H, W) hides the map from the rules (they read shape[2:]); its
    # covariance is carried until the layout is ordinary again. Dropped, the global mean after it read
    # uncorrelated positions: the classifier's forward was 4.4 bits low here, 0.87 on ShuffleNetV2.
    model = ShuffleHead()
    p, me = planned_and_measured(model, 8, max_cov_positions=max_cov)
    # Not the stem's gradient: with 3 input channels its taps' pairs through the ReLU's mask are the
    # depthwise case of the test below (+0.21 bits without the shuffle, +0.25 with it).
    assert_agrees(p, me, 0.2, backward=("b", "fc"))


class DepthwiseBlock(nn.Module):
    """An inverted-residual block's core: ReLU → depthwise 3×3 → BatchNorm → act → 1×1 → global pool."""

    def __init__(self, act):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.act = act
        self.pw = nn.Conv2d(32, 16, 1, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.act(self.bn(self.dw(torch.relu(self.stem(x)))))
        return self.fc(self.pw(y).mean(dim=(2, 3)))


@pytest.mark.xfail(strict=True, reason="depthwise tap pairs through the activation's curvature are not "
                   "modelled (docs/theory.md, 'What is not closed'): dw +0.32/+0.38, stem +0.57/+0.55 bits")
@pytest.mark.parametrize("act", ["silu", "relu6"])
def test_depthwise_before_a_smooth_activation_and_a_global_pool(act):
    # The global pool makes the gradient at the activation's output correlated between positions
    # (ρ ≈ 0.94 one position apart), and a depthwise conv's 9 taps then add cross terms
    # E[w_t w_t' f'(u_a) f'(u_b)] ≠ 0 that the mean-field backward leaves out (see theory.md).
    model = DepthwiseBlock(nn.SiLU() if act == "silu" else nn.ReLU6())
    p, me = planned_and_measured(model, 16)
    assert_agrees(p, me, 0.2)


class Fire(nn.Module):
    """SqueezeNet's fire module (two ReLU'd expansions concatenated) before an overlapping max pool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.e1, self.e3 = nn.Conv2d(16, 32, 1, bias=False), nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.b = nn.Conv2d(64, 32, 1, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(self.pool(torch.cat([torch.relu(self.e1(h)), torch.relu(self.e3(h))], 1)))


def test_max_pool_over_a_concatenation_of_activations():
    # cat(relu(u1), relu(u2)) is relu(cat(u1, u2)): the pool reads the pre-activations, and its
    # gradient, already through the ReLUs, is not halved again when the concat hands each its part.
    # Before: b's forward predicted 0.36 bits high, every gradient below the pool 1.0 bit low.
    model = Fire()
    p, me = planned_and_measured(model, 15, draws=12)
    assert_agrees(p, me, 0.2)
