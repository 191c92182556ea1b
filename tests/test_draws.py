"""init_ draws the random part of the weights while it plans (initscope.draws): same bits, same RNG state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import initscope
from initscope.models import create_model


@pytest.fixture(autouse=True)
def draw_ahead_on_any_machine(monkeypatch):
    # init_ draws ahead only with a spare core; these tests are about that path, so always take it.
    monkeypatch.setattr("initscope.draws.MIN_CORES", 1)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "method,options",
    [("asv-backward", {}), ("orthogonal", {}), ("default", {}), ("kaiming-forward", {"distribution": "truncated_normal"}),
     ("xavier", {"distribution": "uniform"})],
)
@pytest.mark.parametrize("remembered", [False, True], ids=["drawn-ahead", "plan-cached"])
def test_init_writes_what_plan_then_apply_writes(method, options, remembered):
    # Not remembered: init_ propagates the plan and draws in a thread meanwhile. Remembered (the plan
    # cache has it): init_ draws in place at once. Both must write what plan + apply writes.
    model = create_model("resnet18-nobn")
    twin = copy.deepcopy(model)
    initscope.clear_plan_cache()
    if remembered:
        initscope.plan(model, method, input_shape=(3, 32, 32), **options)
    g, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    initscope.init_(model, method, input_shape=(3, 32, 32), generator=g, **options)
    assert initscope.cache_info().hits == int(remembered)
    initscope.plan(twin, method, input_shape=(3, 32, 32), **options).apply(twin, generator=g2)
    assert _same(model, twin)
    assert torch.equal(g.get_state(), g2.get_state())


def test_global_generator_advances_as_apply_would():
    model = create_model("plain34", width=8)
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    initscope.init_(model, "asv-forward", input_shape=(3, 32, 32))
    after_init = torch.rand(3)
    torch.manual_seed(0)
    initscope.plan(twin, "asv-forward", input_shape=(3, 32, 32)).apply(twin)
    assert _same(model, twin)
    assert torch.equal(after_init, torch.rand(3))


class _Unreached(nn.Module):
    """A conv the forward pass never calls: the draws made ahead don't match the plan's and are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Conv2d(3, 4, 3)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_draws_ahead_that_do_not_match_are_not_used():
    model = _Unreached()
    twin = copy.deepcopy(model)
    g, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 8, 8), generator=g)
    initscope.plan(twin, "kaiming-forward", input_shape=(3, 8, 8)).apply(twin, generator=g2)
    assert _same(model, twin)
    assert torch.equal(g.get_state(), g2.get_state())
    assert torch.equal(model.spare.weight, twin.spare.weight)  # untouched by both


def test_failed_plan_leaves_weights_and_generator_alone():
    model = create_model("plain34", width=8)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    with pytest.raises(ValueError):
        initscope.init_(model, "asv-forward", input_shape=(3, 2), generator=g)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state, g.get_state())


@pytest.mark.parametrize("fails", [False, True], ids=["planned", "plan-failed"])
@pytest.mark.parametrize("call", ["init_", "plan"])
def test_torch_threads_come_back(fails, call):
    # The propagation keeps torch to one intra-op thread (beside the draws, and on a machine where
    # another process holds a core); after init_ or plan, planned or failed, the user's setting is back.
    model = create_model("plain34", width=8)
    fn = getattr(initscope, call)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if fails:
            with pytest.raises(ValueError):
                fn(model, "asv-forward", input_shape=(3, 2), cache=False)
        else:
            fn(model, "asv-forward", input_shape=(3, 32, 32), cache=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("call", ["init_", "plan"])
def test_propagation_runs_on_one_thread(monkeypatch, call):
    seen = []
    from initscope.graph import propagate

    real = propagate.Pass.forward

    def forward(self):
        seen.append(torch.get_num_threads())
        return real(self)

    monkeypatch.setattr(propagate.Pass, "forward", forward)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        getattr(initscope, call)(create_model("plain34", width=8), "kaiming-forward", input_shape=(3, 32, 32),
                                 cache=False)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_draw_buffers_are_kept_for_the_next_call_and_reused_bit_for_bit(monkeypatch):
    # A second init_ of the same architecture draws into the first call's buffers (no new pages to
    # fault in); what it writes is still what plan + apply writes. The pool holds at most POOL_BYTES.
    from initscope import draws

    draws.release_buffers()
    model = create_model("resnet18-nobn")
    twin = copy.deepcopy(model)
    initscope.init_(model, "asv-backward", input_shape=(3, 32, 32), cache=False,
                    generator=torch.Generator().manual_seed(1))
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert draws._pool_bytes == weights
    kept = {id(t) for ts in draws._pool.values() for t in ts}
    taken = []
    real = draws._buffer_like
    monkeypatch.setattr(draws, "_buffer_like", lambda t: taken.append(real(t)) or taken[-1])
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), cache=False,
                    generator=torch.Generator().manual_seed(2))
    assert {id(t) for t in taken} == kept  # every draw went into a kept buffer
    initscope.plan(twin, "kaiming-forward", input_shape=(3, 32, 32)).apply(twin, generator=torch.Generator().manual_seed(2))
    assert _same(model, twin)

    draws.release_buffers()
    assert draws._pool_bytes == 0 and not draws._pool
    monkeypatch.setattr(draws, "POOL_BYTES", weights // 2)
    initscope.init_(model, "kaiming-forward", input_shape=(3, 32, 32), cache=False)
    assert 0 < draws._pool_bytes <= weights // 2
    draws.release_buffers()
