import math

import pytest
import torch

from initscope.measure import measure


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def log2_gaps(model, plan, input_shape, *, batch=32, draws=3, seed=0):
    """Per-layer log2(measured / predicted), forward and backward (geometric mean over draws)."""
    me = measure(model, plan, input_shape, batch=batch, draws=draws, seed=seed)
    fwd = [math.log2(me.out_var[l.name] / l.pred_out_var) for l in plan.layers]
    bwd = [math.log2(me.in_grad_var[l.name] / l.pred_in_grad_var) for l in plan.layers]
    return fwd, bwd


@pytest.fixture
def one_thread():
    """One torch thread for the test: the test machine's cores are shared, and OpenMP spin-waiting
    against other processes makes small models many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
