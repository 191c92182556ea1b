"""Methods are objects in a registry: one registered from outside the package plans, is cached,
applies and is listed like a built-in; names are refused twice; the planner asks no method by name."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import initscope
from initscope.methods import METHODS
from initscope.models import create_model


@pytest.fixture
def kaiming15():
    @initscope.register_method("kaiming-1.5")
    class Kaiming15(initscope.Method):
        summary = "Kaiming fan_in with gain 1.5 (a test's own method)"

        def std(self, layer, options):
            fan_in, _ = layer.fans(options.fan)
            return 1.5 * math.sqrt(2.0 / fan_in), False

    yield METHODS["kaiming-1.5"]
    initscope.unregister_method("kaiming-1.5")


def test_a_method_registered_outside_plans_caches_and_applies(kaiming15):
    model = create_model("plain34", width=8)
    initscope.clear_plan_cache()
    p = initscope.plan(model, "kaiming-1.5", input_shape=(3, 32, 32))
    k = initscope.plan(model, "kaiming-forward", input_shape=(3, 32, 32))
    for a, b in zip(p.layers, k.layers):
        assert a.std == pytest.approx(1.5 * b.std, rel=1e-12)
        assert a.distribution == "normal" and a.bias == b.bias
    # Forward second moments scale by 1.5² per weight layer on a BatchNorm-free chain.
    assert p.layers[3].pred_out_var == pytest.approx(k.layers[3].pred_out_var * 1.5 ** 8, rel=1e-9)
    again = initscope.plan(model, "kaiming-1.5", input_shape=(3, 32, 32))
    assert initscope.cache_info().hits >= 1
    assert [l.std for l in again.layers] == [l.std for l in p.layers]
    initscope.init_(model, "kaiming-1.5", input_shape=(3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert initscope.plan_of(model).method == "kaiming-1.5"
    w = model.get_parameter(p.layers[5].weight_path)
    assert float(w.detach().std()) == pytest.approx(p.layers[5].std, rel=0.1)


def test_reregistering_a_name_drops_its_cached_plans(kaiming15):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    first = initscope.plan(model, "kaiming-1.5", input_shape=(3, 8, 8))

    @initscope.register_method("kaiming-1.5", overwrite=True)
    class Kaiming3(initscope.Method):
        def std(self, layer, options):
            return 3.0 * math.sqrt(2.0 / layer.fans(options.fan)[0]), False

    second = initscope.plan(model, "kaiming-1.5", input_shape=(3, 8, 8))
    assert second.layers[0].std == pytest.approx(2 * first.layers[0].std, rel=1e-12)


def test_duplicate_names_and_non_methods_are_refused(kaiming15):
    with pytest.raises(ValueError, match="already registered"):
        @initscope.register_method("xavier")
        class Again(initscope.Method):
            pass

    with pytest.raises(TypeError, match="subclasses of initscope.Method"):
        initscope.register_method("nope")(object)
    with pytest.raises(ValueError, match=r"method='nope' is not one of \('xavier'"):
        initscope.plan(nn.Linear(2, 2), "nope", input_shape=(2,))


def test_listing_reads_the_registry(kaiming15):
    from typer.testing import CliRunner

    from initscope.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "kaiming-1.5" in result.output and "gain 1.5" in result.output


def test_a_method_that_needs_data_says_so():
    @initscope.register_method("needs-a-batch")
    class FromData(initscope.Method):
        needs_data = True

        def std(self, layer, options):
            return 0.1, False

    try:
        with pytest.raises(ValueError, match="pass example_input"):
            initscope.plan(nn.Linear(4, 4), "needs-a-batch", input_shape=(4,))
        p = initscope.plan(nn.Linear(4, 4), "needs-a-batch", example_input=torch.randn(8, 4))
        assert p.layers[0].std == 0.1
    finally:
        initscope.unregister_method("needs-a-batch")


def test_the_planner_asks_no_method_by_name():
    # Adding a method is one file: nothing outside initscope/methods/ may test a method's name.
    import re

    src = Path(initscope.__file__).parent
    asks = re.compile(r"(method|\.name)\s*(==|!=|in|not in)\s*\(?[\"']")
    for path in [src / "planner.py", src / "api.py", src / "plan.py", src / "plan_cache.py", src / "draws.py"]:
        for line in path.read_text().splitlines():
            assert not asks.search(line), (path.name, line)
