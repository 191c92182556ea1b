"""The local engine: run a sweep's runs one after another in this process, through the results store.

For each run: claim it (skipped when finished, diverged, or owned by a live sweep elsewhere), train it
with ``resume=True`` (a run interrupted earlier goes on from its last checkpoint), store every epoch
as it ends, and record the result. An exception inside one run marks that run ``failed`` with its
traceback and the sweep goes on; Ctrl-C, or a disk that filled up, gives the current run back to the
store (it stays reclaimable) and stops. Running the same sweep again therefore resumes it without
repeating or losing a run. A run another sweep took over meanwhile (this one was paused past its
heartbeat) is left to it: nothing more is recorded for it from here.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from initscope.errors import ConfigError, DiskFullError, InitscopeError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.engines.base import (Claims, EngineOption, SweepBar, SweepSummary, TrainFn, check_devices,
                                                default_train, label, prepare, register_engine, result_note)
from initscope.experiments.store import DEFAULT_LEASE_S, Store
from initscope.threads import torch_threads


@register_engine("local", summary="one run after another, in this process",
                 options=(EngineOption("threads", int, "torch CPU threads during the sweep (1 is often fastest "
                                                       "on a shared machine; default: torch's)"),))
def run_sweep(
    sweep: SweepConfig | Sequence[RunConfig],
    *,
    db: str | Path | None = None,
    out: str | Path | None = None,
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
        out: where each run's folder (``out/run_id``: checkpoint, split, probe) goes.
        train_fn: ``train(config, *, out_dir, progress, on_epoch, resume) -> RunResult``; the real
            one by default (a stand-in makes tests cheap).
        progress: a progress bar over runs and over the current run's epochs.
        retry_failed: train runs the store holds as ``failed`` again.
        lease_s: a ``running`` run without a heartbeat for this long is taken over.
        name: the sweep's name in the store (a SweepConfig's own name by default).
        threads: torch's intra-op threads during the sweep (restored after); None leaves torch's
            default. On a shared CPU, 1 can be many times faster than an oversubscribed default.

    Returns:
        A :class:`SweepSummary`. Ctrl-C releases the current run and re-raises KeyboardInterrupt; a full
        disk releases it and raises :class:`~initscope.errors.DiskFullError` naming the file.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads: {threads!r} is not a positive number of threads (leave it out for torch's "
                          "default)")
    job = prepare(sweep, db=db, out=out, name=name)
    check_devices(job.runs)  # this machine runs them: a GPU it lacks is an error now, before any claim
    train_fn = train_fn or default_train()
    summary = SweepSummary(db=job.db, out=job.out, total=len(job.runs))
    start = time.perf_counter()
    with torch_threads(threads), Store(job.db, lease_s=lease_s) as store:
        store.add_sweep(job.sweep_id, job.name, job.grid, [r.run_id for r in job.runs])
        with SweepBar(progress, len(job.runs)) as bar:
            claims = Claims(store, job.runs, retry_failed=retry_failed, summary=summary, bar=bar)
            while (taken := claims.take()) is not None:
                i, cfg, _ = taken
                text = label(cfg, job.label_keys)
                bar.start(f"{i + 1}/{len(job.runs)} {text}", cfg.epochs)
                status = _run_one(store, cfg, job.out, train_fn, bar, summary)
                if status == _TAKEN_OVER:
                    summary.skipped[status] += 1
                    bar.finish(f"{status:<8} {text}  (another sweep took it over while this one was paused)")
                    continue
                summary.ran[status] += 1
                bar.finish(f"{status:<8} {text}" + result_note(store, cfg.run_id))
    summary.seconds = time.perf_counter() - start
    return summary


_TAKEN_OVER = "taken over"


class _TakenOver(InitscopeError):
    """Raised inside a run whose claim another sweep took over: stop training it, record nothing."""


def _run_one(store: Store, cfg: RunConfig, out: Path, train_fn: TrainFn, bar: SweepBar,
             summary: SweepSummary) -> str:
    """Train one claimed run and record what happened; returns its final status."""
    run_id = cfg.run_id
    store.set_run_dir(run_id, out / run_id)

    def on_epoch(row: dict) -> None:
        if not store.add_epoch(run_id, row):
            raise _TakenOver(run_id)
        bar.epoch(row)

    try:
        result = train_fn(cfg, out_dir=out, progress=False, on_epoch=on_epoch, resume=True)
    except _TakenOver:
        return _TAKEN_OVER
    except (KeyboardInterrupt, DiskFullError):
        # not the run's fault: give it back whole, so the same command resumes it (after freeing space)
        try:
            store.release(run_id)
        except DiskFullError:  # the database's disk is the full one: the dead pid frees the run instead
            pass
        raise
    except Exception:  # noqa: BLE001 - one run's failure is a result; the sweep goes on
        error = traceback.format_exc()
        if not store.fail(run_id, error):
            return _TAKEN_OVER
        summary.failures.append((run_id, error))
        return "failed"
    if result.status == "failed" and not result.error:
        result.error = "train() returned status 'failed' without an error message"
    if not store.finish(result):
        return _TAKEN_OVER
    if result.status == "failed":
        summary.failures.append((run_id, result.error))
    return result.status
