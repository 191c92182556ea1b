"""Writing a plan: nothing written unless everything can be, for every method and dtype; weights used
by several calls get one std; wrapped, meta-device and mistyped inputs get an error a user can act on."""

import math

import pytest
import torch
from torch import nn

import initscope
from initscope import draws
from initscope.methods import METHODS


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DTYPES = {"float16": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(),
          "mixed": lambda m: (m[3].half(), m)[1]}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_writes_every_dtype(method, dtype):
    # A mixed model (one conv in half) with orthogonal raised "geqrf_cpu not implemented for 'Half'"
    # after the first layer had been overwritten: draws are made in float32 and rounded once.
    model = DTYPES[dtype](small_cnn())
    before = snapshot(model)
    m = METHODS[method]
    data = {"example_input": torch.randn(16, 3, 8, 8).to(model[0].weight.dtype)} if m.needs_data \
        else {"input_shape": (3, 8, 8)}
    if m.adjusts and dtype == "mixed":
        # A method that runs the model on its batch cannot: a half conv after a float one does not run.
        # It fails before anything is written.
        with pytest.raises(RuntimeError, match="should be the same"):
            initscope.init_(model, method, generator=torch.Generator().manual_seed(123), **data)
        assert same(snapshot(model), before)
        return
    p = initscope.init_(model, method, generator=torch.Generator().manual_seed(123), **data)
    after = snapshot(model)
    for layer in p.layers:
        w = model.get_parameter(layer.weight_path)
        assert w.dtype == before[layer.weight_path].dtype  # the dtype is the model's
        assert not torch.equal(w, before[layer.weight_path]), layer.name
        assert torch.isfinite(w.float()).all()
    if not m.fixed_distribution and not m.adjusts and p.layers[1].std > 0:
        big = model[3].weight.detach().float()  # 576 entries: the std within sampling error
        assert float(big.std()) == pytest.approx(p.layers[1].std, rel=0.15)
    assert after.keys() == before.keys()


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("method", ["kaiming-forward", "orthogonal", "default"])
def test_a_failure_while_drawing_writes_nothing(method, fail_at, monkeypatch):
    model = small_cnn()
    p = initscope.plan(model, method, input_shape=(3, 8, 8))
    before = snapshot(model)
    real, calls = draws.draw_unit, []

    def failing(weight, distribution, generator):
        calls.append(weight)
        if len(calls) > fail_at:
            raise RuntimeError("simulated: the draw failed")
        return real(weight, distribution, generator)

    monkeypatch.setattr(draws, "draw_unit", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        p.apply(model, generator=torch.Generator().manual_seed(1))
    assert same(snapshot(model), before)


def test_mismatch_and_meta_write_nothing():
    model = small_cnn()
    before = snapshot(model)
    other = initscope.plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 4)), "xavier",
                           input_shape=(3, 8, 8))
    with pytest.raises(initscope.PlanMismatchError, match="nothing was written"):
        other.apply(model)
    assert same(snapshot(model), before)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    p = initscope.plan(meta, "kaiming-forward", input_shape=(3, 8, 8))  # shapes only: planning works
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        p.apply(meta)
    with torch.device("meta"):
        normed = small_cnn()
    with pytest.raises(ValueError, match="meta device.*materialize"):
        initscope.plan(normed, "kaiming-forward", input_shape=(3, 8, 8))


class Tied(nn.Module):
    """A conv applied twice (a recurrent or tied block)."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = self.c1 if tied else nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class SharedParameter(Tied):
    """Two modules holding one weight Parameter, each with its own bias."""

    def __init__(self) -> None:
        super().__init__(tied=False)
        self.c2.weight = self.c1.weight


@pytest.mark.parametrize("cls", [Tied, SharedParameter])
@pytest.mark.parametrize("method", ["asv-forward", "asv-backward", "asv-forward-exact", "asv-backward-exact"])
def test_a_weight_used_twice_gets_one_std_from_both_calls(cls, method):
    # Planning a module called twice raised a bare KeyError; two modules sharing a Parameter got two
    # stds and the weight ended at the last one's. Now: one std, the geometric mean of what each call
    # asks for, which is what two separate layers in the same places would get (for the formula
    # methods, whose τ and γ do not depend on the stds).
    model = cls()
    p = initscope.plan(model, method, input_shape=(3, 16, 16))
    names = [l.name for l in p.layers]
    assert names == ["stem", "c1", "fc"]
    c1 = p["c1"]
    assert c1.calls == 2
    assert any("c1" in n and "geometric mean" in n for n in p.notes)
    if cls is SharedParameter:
        assert c1.shared == ("c2",) and c1.other_bias_paths == ("c2.bias",)
    untied = initscope.plan(Tied(tied=False), method, input_shape=(3, 16, 16))
    if not method.endswith("exact"):
        assert c1.std == pytest.approx(math.sqrt(untied["c1"].std * untied["c2"].std), rel=1e-12)
    else:
        lo, hi = sorted((untied["c1"].std, untied["c2"].std))
        assert lo * 0.5 <= c1.std <= hi * 2.0
    model.c2.bias.data.fill_(3.0)
    p.apply(model, generator=torch.Generator().manual_seed(0))
    assert float(model.c2.bias.abs().max()) == 0.0  # the second module's bias is written too
    assert float(model.c1.weight.std()) == pytest.approx(c1.std, rel=0.15)


def test_wrapped_models_are_planned_and_written_through():
    model = small_cnn()
    for wrapped in (nn.DataParallel(model), torch.compile(model)):
        p = initscope.init_(wrapped, "asv-backward", input_shape=(3, 8, 8), generator=torch.Generator().manual_seed(0))
        assert [l.name for l in p.layers] == ["0", "3", "7"]
        assert initscope.plan_of(wrapped) is p and initscope.plan_of(model) is p
        assert initscope.probe(wrapped, torch.randn(4, 3, 8, 8)).layers[0].name == "0"
    with pytest.raises(TypeError, match="wraps a model.*module"):
        initscope.plan(nn.Sequential(nn.DataParallel(small_cnn())), "xavier", input_shape=(3, 8, 8))


@pytest.mark.parametrize("option, value", [("residual_growth", float("inf")), ("residual_growth", float("nan")),
                                           ("residual_growth", True), ("max_std_ratio", True),
                                           ("max_std_ratio", float("inf")), ("max_cov_positions", True),
                                           ("max_cov_positions", 2.5)])
def test_options_refuse_what_is_not_a_number(option, value):
    # residual_growth=inf was blamed on the model ("does not run on input_shape ... index out of
    # range"); True was taken as 1 where a number was meant.
    with pytest.raises(ValueError, match=f"{option}="):
        initscope.plan(small_cnn(), "asv-backward", input_shape=(3, 8, 8), **{option: value})


def test_what_a_model_zeroed_itself_stays_zero_unless_asked():
    # timm's zero_init_last / torchvision's zero_init_residual: the ASV methods' default residual
    # policy rescaled those zero BatchNorm gammas (0 -> 0.21 on a timm ResNet-50); now they stay at zero,
    # an explicit residual="scale" rescales them, and the plan lists what it writes beyond weight layers.
    import torchvision

    model = torchvision.models.resnet18(zero_init_residual=True)
    p = initscope.init_(model, "asv-backward", input_shape=(3, 32, 32))
    assert all(float(b.bn2.weight.detach().abs().max()) == 0.0 for layer in (model.layer1, model.layer4) for b in layer)
    assert any("kept at zero what the model zeroed itself: 8" in n for n in p.notes)
    forced = initscope.plan(model, "asv-backward", input_shape=(3, 32, 32), residual="scale")
    assert len(forced.norm_scales) == 8 and all(v > 0 for v in forced.norm_scales.values())
    assert any("writes 8 normalization weight(s)" in n for n in forced.notes)
    fresh = initscope.plan(torchvision.models.resnet18(), "asv-backward", input_shape=(3, 32, 32))
    assert any("writes 8 normalization weight(s)" in n and "layer1.0.bn2" in n for n in fresh.notes)
