"""Probe speed: initscope.probe(resnet18, batch) against a plain forward and backward of the same batch,
median of 5, side by side in one process, on the CPU.

Targets (issue 3): ratio <= 1.5 with everything (quantiles and histograms), <= 1.2 with moments only
(quantiles=False, histograms=False). Prints both ratios; run with
`python benchmarks/probe_speed.py [--size 224] [--batch 16] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnet18

import initscope


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", default="weighted", help="weighted or all")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18()
    x = torch.randn(args.batch, 3, args.size, args.size)
    gen = torch.Generator().manual_seed(0)

    def plain() -> None:
        # What the probe does minus the hooks: a copy of the batch that requires grad, the noise loss,
        # and gradients by autograd.grad with respect to the input and the weight layers' weights.
        xx = x.detach().clone().requires_grad_(True)
        out = model(xx)
        noise = torch.randn(out.shape, generator=gen.manual_seed(0))
        weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        torch.autograd.grad((out * noise).sum(), [xx, *weights])

    def full() -> None:
        initscope.probe(model, x, layers=args.layers)

    def moments() -> None:
        initscope.probe(model, x, layers=args.layers, quantiles=False, histograms=False)

    plain(), full(), moments()  # warm up allocator and kernels for all three
    # Interleaved, so a busy neighbour slows all three alike.
    t_plain, t_full, t_mom = [], [], []
    for _ in range(args.repeats):
        t_plain.append(median_time(plain, 1))
        t_full.append(median_time(full, 1))
        t_mom.append(median_time(moments, 1))
    base, f, m = statistics.median(t_plain), statistics.median(t_full), statistics.median(t_mom)
    print(f"resnet18, batch {args.batch}x3x{args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, layers={args.layers}")
    print(f"plain forward+backward       : {base:.3f} s  1.00")
    print(f"probe (quantiles, histograms): {f:.3f} s  {f / base:.2f}x   (target <= 1.5)")
    print(f"probe (moments only)         : {m:.3f} s  {m / base:.2f}x   (target <= 1.2)")


if __name__ == "__main__":
    main()
