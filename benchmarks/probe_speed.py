"""Probe speed: initscope.probe(resnet18, batch) against a plain forward and backward of the same batch,
median of 5, side by side in one process, on the CPU.

Targets (issue 3): ratio <= 1.5 with everything (quantiles and histograms), <= 1.2 with moments only
(quantiles=False, histograms=False). Prints both ratios, of wall-clock time and of the process's CPU
time (steadier when other processes share the cores); run with
`python benchmarks/probe_speed.py [--size 224] [--batch 16] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnet18

import initscope


def timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "full": [], "moments": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("full", full), ("moments", moments)):
            runs[name].append(timed(fn))
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    print(f"resnet18, batch {args.batch}x3x{args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, layers={args.layers}")
    print("                               wall s  ratio   cpu s  ratio")
    for name, label, target in (("plain", "plain forward+backward", ""),
                                ("full", "probe (quantiles, histograms)", "(target <= 1.5)"),
                                ("moments", "probe (moments only)", "(target <= 1.2)")):
        print(f"{label:30s} {wall[name]:6.3f}  {wall[name] / wall['plain']:5.2f}  {cpu[name]:6.3f}  "
              f"{cpu[name] / cpu['plain']:5.2f}  {target}")
    print("(CPU time is the steadier measure on a shared machine; the targets are for wall-clock time on a quiet one)")


if __name__ == "__main__":
    main()
