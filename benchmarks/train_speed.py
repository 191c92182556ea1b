"""Training speed: initscope's loop (``initscope.experiments.training.train``) against a bare PyTorch loop over the
same model, data tensors, augmentation, optimizer, batch size and steps, side by side in one process.

Each epoch is one train pass over the shuffled (and, with ``--augment``, augmented: the same
``augment_batch`` with the same per-batch seeds) train split plus one validation pass, in both loops; our
loop's epoch also has the progress bookkeeping, accuracy counting, divergence and early-stop checks, the
history row, and, as in a sweep, the resume state and the best checkpoint written to disk (copied at the
epoch's end, written on a thread of their own while the next epoch trains; ``--no-disk`` leaves them in memory). An epoch is timed from the end of the one before to its own end (our loop: between two
``on_epoch`` calls, so the checkpoint writes count). Throughput = train images per second; the median over
``--repeats`` fresh runs of their epochs after the first (which warms up), the two loops alternating so that
load from other processes falls on both alike. Target (issue 15): ratio >= 0.95.

``--loaders`` compares what feeds the step instead, each through a whole epoch of the same model on one
thread: the batches augmented in the training process (initscope's default), the same in a ``DataLoader``
worker (``workers=1``), and torchvision's per-sample transforms (``RandomCrop(padding, reflect)`` and
``RandomHorizontalFlip``) in a ``DataLoader`` with 0, 1 and 2 workers.

Run with ``.venv/bin/python benchmarks/train_speed.py [--data folder:food101-10-full --data-root DATA
--image-size 64 --augment crop-flip] [--loaders]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import initscope
from initscope.experiments.config import RunConfig
from initscope.experiments.data import load_data
from initscope.experiments.training import build_model, train
from initscope.experiments.training.augment import Feeder, crop_padding
from initscope.experiments.training.optim import make_optimizer
from initscope.threads import torch_threads


def _data(config: RunConfig):
    return load_data(config.data, root=config.data_root, seed=config.seed, image_size=config.image_size,
                     limit=config.limit, eval_limit=config.eval_limit)


def _model_and_opt(config: RunConfig, data):
    torch.manual_seed(config.seed)
    model = build_model(config, data.in_channels, data.num_classes)
    initscope.init_(model, config.method, input_shape=data.input_shape)
    return model, make_optimizer(config.optimizer, model.parameters(), config.lr)


def _validate(model, xv: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        for s in range(0, len(xv), 256):
            model(xv[s:s + 256])


def bare_epochs(config: RunConfig, epochs: int) -> list[float]:
    """Seconds per epoch of the plainest loop: shuffled (augmented) slices of the same tensors, forward,
    backward, step, then a validation pass."""
    data = _data(config)
    x, y = data.train.tensors
    xv, _ = data.val.tensors
    model, opt = _model_and_opt(config, data)
    g = torch.Generator().manual_seed(config.seed)
    feed = Feeder(x, y, config.batch_size, config.augment, config.seed)
    times, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in feed.epoch(epoch, g):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _validate(model, xv)
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    return times


def ours_epochs(config: RunConfig, disk: bool) -> list[float]:
    """Seconds per epoch of ``train``, from one epoch's end (``on_epoch``) to the next's."""
    stamps = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as tmp:
        train(config, out_dir=tmp if disk else None, progress=False, resume=False,
              on_epoch=lambda row: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def time_both(args: argparse.Namespace) -> None:
    """Time both loops on the model and data of ``args``, alternating, and print the throughputs."""
    config = _config(args)
    n = len(_data(config).train)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare += bare_epochs(config, args.epochs)[1:]
        ours += ours_epochs(config, not args.no_disk)[1:]
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{args.model} width {args.width}, {args.data} ({n} train images, {config.image_size or 'own'} px), "
          f"augment {args.augment}, {args.optimizer}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"checkpoints {'in memory' if args.no_disk else 'on disk'}")
    print(f"bare PyTorch loop : {n / b:8.0f} img/s  (median epoch {b:.3f} s)")
    print(f"initscope.train   : {n / o:8.0f} img/s  (median epoch {o:.3f} s)")
    print(f"throughput ratio  : {b / o:.3f}   (target >= 0.95)")


# -- what feeds the step ----------------------------------------------------------------------------------


class _PerSample(torch.utils.data.Dataset):
    """torchvision's per-sample transforms over the same tensors (the usual DataLoader pipeline)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from torchvision.transforms import v2

        pad = crop_padding(tuple(x.shape[-2:]))
        self.x, self.y = x, y
        self.t = v2.Compose([v2.RandomCrop(tuple(x.shape[-2:]), padding=pad, padding_mode="reflect"),
                             v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.t(self.x[i]), self.y[i]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def time_loaders(args: argparse.Namespace) -> None:
    """One epoch of the same model fed by each pipeline; images per second."""
    config = _config(args)
    data = _data(config)
    x, y = data.train.tensors
    n = len(x)
    feeds = {
        "batched, in the training process (default)": lambda: Feeder(x, y, config.batch_size, config.augment,
                                                                    config.seed),
        "batched, 1 DataLoader worker (workers=1)": lambda: Feeder(x, y, config.batch_size, config.augment,
                                                                  config.seed, workers=1),
    }
    per_sample = {f"per-sample torchvision, {w} worker(s)": w for w in (0, 1, 2)}
    results: dict[str, list[float]] = {name: [] for name in [*feeds, *per_sample]}
    for _ in range(args.repeats):
        for name, make in feeds.items():
            feeder = make()
            try:
                results[name].append(_epoch_seconds(config, data, lambda e, g: feeder.epoch(e, g)))
            finally:
                feeder.close()
        for name, workers in per_sample.items():
            loader = torch.utils.data.DataLoader(_PerSample(x, y), batch_size=config.batch_size, shuffle=True,
                                                 num_workers=workers, worker_init_fn=_one_thread,
                                                 persistent_workers=workers > 0, drop_last=True)
            results[name].append(_epoch_seconds(config, data, lambda e, g: iter(loader)))
    print(f"{args.model} width {args.width}, {args.data} ({n} train images), augment {args.augment}, "
          f"{torch.get_num_threads()} training thread(s); one epoch, median of {args.repeats}")
    base = statistics.median(results[next(iter(feeds))])
    for name, secs in results.items():
        m = statistics.median(secs)
        print(f"{name:<46}: {n / m:7.0f} img/s  (epoch {m:.2f} s, {base / m:.2f}x the default)")


def _epoch_seconds(config: RunConfig, data, batches_of) -> float:
    model, opt = _model_and_opt(config, data)
    g = torch.Generator().manual_seed(config.seed)
    model.train()
    for xb, yb in batches_of(0, g):  # a warm-up epoch: workers start, caches fill
        break
    t0 = time.perf_counter()
    for xb, yb in batches_of(1, g):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def _config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(data=args.data, data_root=args.data_root, model=args.model, width=args.width,
                     optimizer=args.optimizer, batch_size=args.batch_size, epochs=args.epochs, device="cpu",
                     image_size=args.image_size, augment=args.augment, limit=args.limit, method=args.method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="plain34")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--augment", default="none")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--method", default="kaiming-forward")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-disk", action="store_true", help="our loop keeps its checkpoints in memory")
    parser.add_argument("--loaders", action="store_true", help="compare what feeds the step instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    with torch_threads(args.threads or None):
        (time_loaders if args.loaders else time_both)(args)


if __name__ == "__main__":
    main()
