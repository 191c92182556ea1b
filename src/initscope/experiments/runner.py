"""The local engine: run a sweep's runs one after another in this process, through the results store.

For each run: claim it (skipped when finished, diverged, or owned by a live sweep elsewhere), train it
with ``resume=True`` (a run interrupted earlier goes on from its last checkpoint), store every epoch
as it ends, and record the result. An exception inside one run marks that run ``failed`` with its
traceback and the sweep goes on; Ctrl-C gives the current run back to the store (it stays reclaimable)
and stops. Running the same sweep again therefore resumes it without repeating or losing a run.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initscope.experiments.preflight import check_output
from initscope.experiments.store import DEFAULT_LEASE_S, Store
from initscope.experiments.sweep import SweepConfig

TrainFn = Callable[..., Any]


@dataclass
class SweepSummary:
    """What one call of :func:`run_sweep` did.

    Attributes:
        total: runs in the sweep.
        ran: runs this call trained, by final status (``finished``, ``diverged``, ``failed``).
        skipped: runs it did not train, by reason (``finished``, ``diverged``, ``failed`` when not
            retried, ``owned`` when another live sweep has it).
        seconds: wall time of this call.
    """

    db: Path
    out: Path
    total: int
    ran: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.ran.items())) or "none"
        skipped = ", ".join(f"{n} {s}" for s, n in sorted(self.skipped.items())) or "none"
        return (f"{self.total} runs: trained {sum(self.ran.values())} ({ran}); skipped "
                f"{sum(self.skipped.values())} ({skipped}); {self.seconds:.0f} s")


def _default_train() -> TrainFn:
    from initscope.experiments.train import train

    return train


def _label(cfg: Any, keys: Sequence[str]) -> str:
    d = cfg.to_dict()
    return " ".join(f"{k}={d[k]}" if k in ("lr", "seed") else str(d[k]) for k in keys if k in d)


def resolve_sweep(sweep: SweepConfig | Sequence[Any], *, db: str | Path | None, out_dir: str | Path | None,
                  name: str | None) -> tuple[list[Any], Path, Path, str, dict[str, Any], str | None, list[str]]:
    """The runs, database, output folder, sweep id, grid record, name and label axes of ``sweep``
    (a SweepConfig's ``db`` and ``out`` unless given); shared by the local and the Ray engine."""
    if isinstance(sweep, SweepConfig):
        runs = sweep.expand()
        db = Path(db) if db is not None else sweep.db
        out = Path(out_dir) if out_dir is not None else sweep.out
        label_keys = [k for k, v in sweep.grid.items() if len(v) > 1 or isinstance(v, dict)]
        return runs, db, out, sweep.sweep_id, sweep.to_dict(), name or sweep.name, label_keys
    runs = list(sweep)
    if db is None:
        raise ValueError("db= is required when the sweep is a list of RunConfigs")
    db = Path(db)
    out = Path(out_dir) if out_dir is not None else db.with_suffix("")
    sweep_id = hashlib.sha1(",".join(r.run_id for r in runs).encode()).hexdigest()[:12]
    return runs, db, out, sweep_id, {"grid": {}, "run": {}}, name, ["data", "model", "method", "optimizer", "lr", "seed"]


def run_sweep(
    sweep: SweepConfig | Sequence[Any],
    *,
    db: str | Path | None = None,
    out_dir: str | Path | None = None,
    train_fn: TrainFn | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    name: str | None = None,
    threads: int | None = None,
) -> SweepSummary:
    """Run every run of ``sweep`` that the store does not already hold as done.

    Args:
        sweep: a :class:`SweepConfig` (its ``db`` and ``out`` are the defaults below) or a list of
            RunConfigs.
        db: the results database; required for a plain list.
        out_dir: where each run's folder (``out_dir/run_id``: checkpoint, split, probe) goes.
        train_fn: ``train(config, *, out_dir, progress, on_epoch, resume) -> RunResult``; the real
            one by default (a stand-in makes tests cheap).
        progress: a progress bar over runs and over the current run's epochs.
        retry_failed: train runs the store holds as ``failed`` again.
        lease_s: a ``running`` run without a heartbeat for this long is taken over.
        name: the sweep's name in the store (a SweepConfig's own name by default).
        threads: torch's intra-op threads during the sweep (restored after); None leaves torch's
            default. On a shared CPU, 1 can be many times faster than an oversubscribed default.

    Returns:
        A :class:`SweepSummary`. Ctrl-C releases the current run and re-raises KeyboardInterrupt.
    """
    runs, db, out, sweep_id, grid, name, label_keys = resolve_sweep(sweep, db=db, out_dir=out_dir, name=name)
    check_output(out, db)  # an unwritable folder or a full disk is an error now, not after the first run
    train_fn = train_fn or _default_train()
    summary = SweepSummary(db=db, out=out, total=len(runs))
    start = time.perf_counter()
    with _torch_threads(threads), Store(db, lease_s=lease_s) as store:
        store.add_sweep(sweep_id, name, grid, [r.run_id for r in runs])
        with _Bar(progress, len(runs)) as bar:
            for i, cfg in enumerate(runs):
                label = _label(cfg, label_keys) or cfg.run_id
                claim = store.claim(cfg.run_id, cfg.to_dict(), retry_failed=retry_failed)
                if not claim.taken:
                    summary.skipped[claim.reason] += 1
                    bar.skip()
                    continue
                bar.start_run(f"{i + 1}/{len(runs)} {label}", cfg.epochs)
                status = _run_one(store, cfg, out, train_fn, bar)
                summary.ran[status] += 1
                bar.end_run(f"{status:<8} {label}" + _result_note(store, cfg.run_id))
    summary.seconds = time.perf_counter() - start
    return summary


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n!r}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_one(store: Store, cfg: Any, out: Path, train_fn: TrainFn, bar: "_Bar") -> str:
    """Train one claimed run and record what happened; returns its final status."""
    run_id = cfg.run_id
    store.set_run_dir(run_id, out / run_id)

    def on_epoch(row: dict) -> None:
        store.add_epoch(run_id, row)
        bar.epoch(row)

    try:
        result = train_fn(cfg, out_dir=out, progress=False, on_epoch=on_epoch, resume=True)
    except KeyboardInterrupt:
        store.release(run_id)
        raise
    except Exception:  # noqa: BLE001 - one run's failure is a result; the sweep goes on
        store.fail(run_id, traceback.format_exc())
        return "failed"
    if result.status == "failed" and not result.error:
        result.error = "train() returned status 'failed' without an error message"
    store.finish(result)
    return result.status


def _result_note(store: Store, run_id: str) -> str:
    row = store.run(run_id) or {}
    if row.get("status") == "failed":
        last = (row.get("error") or "").strip().splitlines()[-1:] or [""]
        return f"  ({last[0][:120]})"
    if row.get("status") == "diverged":
        return f"  (non-finite loss in epoch {row.get('diverged_epoch')})"
    parts = []
    if row.get("best_val_accuracy") is not None:
        parts.append(f"best val acc {100 * row['best_val_accuracy']:.2f}%")
    if row.get("test_accuracy") is not None:
        parts.append(f"test acc {100 * row['test_accuracy']:.2f}%")
    return f"  ({', '.join(parts)})" if parts else ""


class _Bar:
    """Two rich progress bars, runs and the current run's epochs; silent when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.progress = None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=False)
            self.progress.__enter__()
            self.runs = self.progress.add_task("runs", total=self.total)
            self.epochs = self.progress.add_task("  epochs", total=1, visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def skip(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.runs)

    def start_run(self, description: str, epochs: int) -> None:
        if self.progress is not None:
            self.progress.update(self.runs, description=description)
            self.progress.reset(self.epochs, total=max(1, int(epochs)), visible=True, description="  epochs")

    def epoch(self, row: dict) -> None:
        if self.progress is not None:
            val = row.get("val_accuracy")
            note = f"  epoch {row.get('epoch')}" + (f" · val acc {100 * val:.1f}%" if isinstance(val, float) else "")
            self.progress.update(self.epochs, advance=1, description=note)

    def end_run(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, markup=False)
            self.progress.advance(self.runs)


# -- the demo ------------------------------------------------------------------------------------------

DEMO_METHODS = ("xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward",
                "asv-forward-exact", "asv-backward-exact")


def demo_sweep(out_dir: str | Path, *, epochs: int = 8) -> SweepConfig:
    """The demo's sweep: scikit-learn's digits (no download), the poster's plain 34-layer net at width 8,
    the five methods of the papers and the two exact ASV variants, Adam at 1e-3, one seed.
    ``examples/demo_digits.toml`` is the same sweep as a file."""
    out_dir = Path(out_dir)
    return SweepConfig(grid={"data": ["digits"], "model": ["plain34"], "method": list(DEMO_METHODS),
                             "optimizer": ["adam"], "lr": [1e-3], "seed": [0]},
                       fixed={"width": 8, "epochs": epochs, "batch_size": 64},
                       db=out_dir / "sweep.db", out=out_dir / "runs", name="demo-digits")


def run_demo_sweep(out_dir: str | Path, *, epochs: int = 8, progress: bool = True,
                   threads: int | None = 1) -> tuple[SweepSummary, Any]:
    """Run :func:`demo_sweep` (resuming what an earlier call left) and write its report to
    ``out_dir/report`` (``report.html``, ``report.md``, CSVs, curves). Returns (summary, report).

    One torch thread by default: the width-8 net's convolutions gain little from a second thread, and
    on a shared machine an oversubscribed default can be many times slower.
    """
    from initscope.experiments.report import write_report

    sweep = demo_sweep(out_dir, epochs=epochs)
    summary = run_sweep(sweep, progress=progress, threads=threads)
    report = write_report(sweep.db, Path(out_dir) / "report",
                          title="initscope demo: initializations of a plain 34-layer net on digits")
    return summary, report
