"""Sweep engines side by side: one 16-run sweep on synthetic data (plain34 at width 4, 64 train images,
1 epoch) with the local engine and with Ray on 2 local CPUs, in one process.

Printed per engine: the wall time of the sweep (Ray's start-up, ``ray.init``, timed apart), and the
time the runs spent inside ``train`` (measured around each call, in whichever process ran it). Ray's
overhead per run is the CPU time a run cost beyond its own training:

    overhead per run = (wall_ray * cpus - sum of the runs' train seconds under Ray) / runs

(worker start-up and imports, scheduling, shipping the function and the result, the driver's writes,
and Ray's own processes competing for the same CPUs). The local engine's overhead per run is the same
quantity with ``cpus = 1``. Ray is timed twice on one ``ray.init``: the first sweep on cold workers
(each starts, imports torch, loads the data), the second on warm ones. With ``--repeats N`` each
engine runs N fresh sweeps, alternating, and the medians are printed. Run with
``.venv/bin/python benchmarks/sweep_engines.py`` (needs ``pip install 'initscope[ray]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from initscope.experiments.config import SweepConfig


class TimedTrain:
    """train(), timed: each call leaves ``<run_id>.json`` with its seconds in ``folder`` (works in Ray workers)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __call__(self, config, **kw):
        from initscope.experiments.training import train

        t0 = time.perf_counter()
        result = train(config, **kw)
        seconds = time.perf_counter() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{config.run_id}.json").write_text(json.dumps({"seconds": seconds}))
        return result

    def total(self) -> float:
        return sum(json.loads(p.read_text())["seconds"] for p in self.folder.glob("*.json"))


def sixteen_runs(root: Path, runs: int) -> SweepConfig:
    methods = ["xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward", "lecun",
               "orthogonal", "default"]
    seeds = list(range(max(1, -(-runs // len(methods)))))
    sweep = SweepConfig(grid={"data": ["synthetic"], "method": methods, "seed": seeds},
                        fixed={"width": 4, "epochs": 1, "batch_size": 32, "limit": 64},
                        db=root / "sweep.db", out=root / "runs", name="engine-benchmark")
    assert len(sweep.expand()) >= runs
    return sweep


def _timed_sweep(runs: int, engine) -> dict[str, float]:
    """Run the first ``runs`` runs with ``engine(runs, db, out, train_fn)``; wall time and time in training."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep = sixteen_runs(root, runs)
        timed = TimedTrain(root / "times")
        t0 = time.perf_counter()
        summary = engine(sweep.expand()[:runs], sweep.db, sweep.out, timed)
        wall = time.perf_counter() - t0
        assert summary.ran == {"finished": runs}, summary.line()
        return {"wall": wall, "train": timed.total()}


def one_local(runs: int) -> dict[str, float]:
    from initscope.experiments.engines import run_sweep

    return _timed_sweep(runs, lambda cfgs, db, out, fn: run_sweep(cfgs, db=db, out=out, train_fn=fn,
                                                                  progress=False, threads=1))


def _ray_sweep(runs: int) -> dict[str, float]:
    from initscope.experiments.engines import run_sweep_ray

    return _timed_sweep(runs, lambda cfgs, db, out, fn: run_sweep_ray(cfgs, db=db, out=out, train_fn=fn,
                                                                      progress=False))


def one_ray(runs: int, cpus: int) -> dict[str, float]:
    """A fresh local Ray: one sweep on cold workers (they start, import torch, load the data), then the same
    sweep again (a fresh database) on the now warm workers."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - t0
    try:
        cold, warm = _ray_sweep(runs), _ray_sweep(runs)
    finally:
        ray.shutdown()
    return {"init": init, "wall": cold["wall"], "train": cold["train"], "warm_wall": warm["wall"],
            "warm_train": warm["train"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--repeats", type=int, default=1, help="fresh sweeps per engine; medians printed")
    args = ap.parse_args()
    local, distributed = [], []
    for _ in range(args.repeats):
        local.append(one_local(args.runs))
        distributed.append(one_ray(args.runs, args.cpus))

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    lw, lt = med(local, "wall"), med(local, "train")
    ri = med(distributed, "init")
    n, c = args.runs, args.cpus
    print(f"{n} runs (synthetic, plain34 width 4, 64 images, 1 epoch); median of {args.repeats}")
    print(f"local engine, 1 CPU       : {lw:6.1f} s wall, {lt:6.1f} s in train(); overhead {(lw - lt) / n:5.2f} s/run")
    for tag, w, t in (("cold workers", "wall", "train"), ("warm workers", "warm_wall", "warm_train")):
        rw, rt = med(distributed, w), med(distributed, t)
        print(f"ray, {c} CPUs, {tag}: {rw:6.1f} s wall, {rt:6.1f} s in train(); overhead "
              f"{(rw * c - rt) / n:5.2f} CPU-s/run; ray/local wall {rw / lw:5.2f}")
    print(f"ray.init: {ri:.1f} s (not in the walls above)")


if __name__ == "__main__":
    main()
