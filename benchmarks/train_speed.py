"""Training speed: initscope's loop (``initscope.experiments.training.train``) against a bare PyTorch loop over the
same model, data tensors, optimizer, batch size and steps, side by side in one process.

Each epoch is one train pass over the shuffled train split plus one validation pass, in both loops; our
loop's epoch also has the progress bookkeeping, accuracy counting, divergence checks, the best-weights
copy and the history row. Throughput = train images per second of epoch time; the median of 5 repeats
of the second epoch of a fresh run (the first warms up) on each side, the two alternating. Target (issue 4): ratio >= 0.9. Run with
``.venv/bin/python benchmarks/train_speed.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import initscope
from initscope.experiments.config import RunConfig
from initscope.experiments.data import load_data
from initscope.experiments.training import build_model, train
from initscope.experiments.training.optim import make_optimizer
from initscope.threads import torch_threads


def bare_epochs(config: RunConfig, epochs: int) -> list[float]:
    """Seconds per epoch of the plainest loop: shuffled slices of the same tensors, forward, backward, step."""
    data = load_data(config.data, seed=config.seed, image_size=config.image_size, limit=config.limit)
    x, y = data.train.tensors
    xv, yv = data.val.tensors
    torch.manual_seed(config.seed)
    model = build_model(config, data.in_channels, data.num_classes)
    initscope.init_(model, config.method, input_shape=data.input_shape)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    g = torch.Generator().manual_seed(config.seed)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), config.batch_size):
            idx = order[s:s + config.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for s in range(0, len(xv), 256):
                model(xv[s:s + 256])
        times.append(time.perf_counter() - t0)
    return times


def time_both(args: argparse.Namespace) -> None:
    """Time both loops on the model and data of ``args``, alternating, and print the throughputs."""
    # two epochs per side and repeat, the first one warming caches and the allocator; the two loops
    # alternate, so that load from other processes falls on both alike
    config = RunConfig(data=args.data, model=args.model, width=args.width, optimizer=args.optimizer,
                       batch_size=args.batch_size, epochs=2, device="cpu")
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_epochs(config, 2)[1])
        ours.append(train(config, progress=False).history[1]["seconds"])
    n = len(load_data(config.data, seed=config.seed).train)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{args.model} width {args.width}, {args.data} ({n} train images), {args.optimizer}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"bare PyTorch loop : {n / b:8.0f} img/s  (median epoch {b:.3f} s)")
    print(f"initscope.train   : {n / o:8.0f} img/s  (median epoch {o:.3f} s)")
    print(f"throughput ratio  : {b / o:.3f}   (target >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain34")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    with torch_threads(args.threads or None):
        time_both(args)


if __name__ == "__main__":
    main()
