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


@pytest.fixture(autouse=True, scope="session")
def _folder_cache(tmp_path_factory):
    """Decoded folders go to a cache of the test session's own, never the user's ~/.cache (subprocesses too)."""
    import os

    before = os.environ.get("INITSCOPE_CACHE_DIR")
    os.environ["INITSCOPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("initscope-cache"))
    yield
    if before is None:
        os.environ.pop("INITSCOPE_CACHE_DIR", None)
    else:
        os.environ["INITSCOPE_CACHE_DIR"] = before
