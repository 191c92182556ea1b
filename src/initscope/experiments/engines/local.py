"""The local engine: run a sweep's runs in this process one after another, or ``parallel`` at a time in
worker processes, through the results store.

For each run: claim it (skipped when finished, diverged, or owned by a live sweep elsewhere), train it
with ``resume=True`` (a run interrupted earlier goes on from its last checkpoint), store every epoch
as it ends, and record the result. An exception inside one run marks that run ``failed`` with its
traceback and the sweep goes on; Ctrl-C, or a disk that filled up, gives the current run(s) back to the
store (they stay reclaimable) and stops. Running the same sweep again therefore resumes it without
repeating or losing a run. A run another sweep took over meanwhile (this one was paused past its
heartbeat) is left to it: nothing more is recorded for it from here.

``parallel=N`` (``--parallel N``): N runs side by side, each in a worker process of its own with one torch
thread (``threads`` per worker when given). On a CPU of a few cores, N single-thread runs finish a sweep
sooner than one run on N threads: a small net's step spends much of its time in ops too small to split.
This process stays the only writer of the database: it claims each run before handing it to a worker,
and the workers send their epochs and results back (as the Ray engine's do). A folder source is decoded
into its cache here before the workers start, so that they read it rather than each decode it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import queue
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from initscope.errors import ConfigError, DiskFullError, InitscopeError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.engines.base import (Claims, EngineOption, SweepBar, SweepSummary, TrainFn, check_devices,
                                                default_train, label, prepare, register_engine, result_note,
                                                start_claimed)
from initscope.experiments.store import DEFAULT_LEASE_S, Store
from initscope.threads import torch_threads

# Seconds the parallel driver waits for a worker's run to end before it looks at the epochs sent meanwhile.
_POLL_S = 0.5


@register_engine("local", summary="one run after another in this process, or --parallel N side by side",
                 options=(EngineOption("threads", int, "torch CPU threads during the sweep (1 is often fastest "
                                                       "on a shared machine; default: torch's; with --parallel: "
                                                       "per worker, default 1)"),
                          EngineOption("parallel", int, "runs side by side, each in a worker process with one "
                                                        "torch thread (default 1: one run at a time, here)")))
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
    parallel: int | None = None,
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
            default. On a shared CPU, 1 can be many times faster than an oversubscribed default. With
            ``parallel``: each worker's threads (default 1).
        parallel: run this many runs side by side in worker processes (None or 1: one at a time, here).
            ``train_fn`` must then be importable by name (a module-level function), as workers receive it
            by pickling.

    Returns:
        A :class:`SweepSummary`. Ctrl-C releases the current run and re-raises KeyboardInterrupt; a full
        disk releases it and raises :class:`~initscope.errors.DiskFullError` naming the file.
    """
    for flag, value, what in (("--threads", threads, "threads (leave it out for torch's default)"),
                              ("--parallel", parallel, "runs side by side (leave it out for one at a time)")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag}: {value!r} is not a positive number of {what}")
    job = prepare(sweep, db=db, out=out, name=name)
    check_devices(job.runs)  # this machine runs them: a GPU it lacks is an error now, before any claim
    train_fn = train_fn or default_train()
    summary = SweepSummary(db=job.db, out=job.out, total=len(job.runs))
    start = time.perf_counter()
    workers = parallel or 1
    with torch_threads(threads if workers == 1 else None), Store(job.db, lease_s=lease_s) as store:
        store.add_sweep(job.sweep_id, job.name, job.grid, [r.run_id for r in job.runs])
        with SweepBar(progress, len(job.runs), title="runs" if workers == 1 else f"runs ({workers} at a time)",
                      epochs=workers == 1) as bar:
            claims = Claims(store, job.runs, retry_failed=retry_failed, summary=summary, bar=bar,
                            more=lambda: job.after_choices(store))
            if workers == 1:
                while (taken := claims.take()) is not None:
                    i, cfg, _ = taken
                    text = label(cfg, job.label_keys)
                    bar.start(f"{i + 1}/{claims.count} {text}", cfg.epochs)
                    _report(store, cfg, text, _run_one(store, cfg, job.out, train_fn, bar), summary, bar)
            else:
                _run_parallel(store, claims, job, train_fn, summary, bar, workers, threads or 1)
        summary.waiting_groups = job.undecided()
    summary.seconds = time.perf_counter() - start
    return summary


def _report(store: Store, cfg: RunConfig, text: str, outcome: tuple[str, str | None], summary: SweepSummary,
            bar: SweepBar) -> None:
    """Count a run that ended and print its line."""
    status, error = outcome
    if status == _TAKEN_OVER:
        summary.skipped[status] += 1
        bar.finish(f"{status:<8} {text}  (another sweep took it over while this one was paused)")
        return
    summary.ran[status] += 1
    if error is not None:
        summary.failures.append((cfg.run_id, error))
    bar.finish(f"{status:<8} {text}" + result_note(store, cfg.run_id))


_TAKEN_OVER = "taken over"


class _TakenOver(InitscopeError):
    """Raised inside a run whose claim another sweep took over: stop training it, record nothing."""


def _give_back(store: Store, run_id: str) -> None:
    """A run interrupted through no fault of its own (Ctrl-C, a full disk): given back whole, so the same
    command resumes it."""
    try:
        store.release(run_id)
    except DiskFullError:  # the database's disk is the full one: the dead pid frees the run instead
        pass


def _record(store: Store, run_id: str, result: Any = None, error: str | None = None) -> tuple[str, str | None]:
    """Record a run's result, or its failure with ``error`` (a traceback); returns (its status, the error of a
    failed run) or (``taken over``, None) when another sweep holds the run now."""
    if result is None:
        return ("failed", error) if store.fail(run_id, error or "") else (_TAKEN_OVER, None)
    if result.status == "failed" and not result.error:
        result.error = "train() returned status 'failed' without an error message"
    if not store.finish(result):
        return _TAKEN_OVER, None
    return result.status, result.error if result.status == "failed" else None


def _run_one(store: Store, cfg: RunConfig, out: Path, train_fn: TrainFn, bar: SweepBar) -> tuple[str, str | None]:
    """Train one claimed run here and record what happened; returns (its final status, its error if it failed)."""
    run_id = cfg.run_id
    store.set_run_dir(run_id, out / run_id)

    def on_epoch(row: dict) -> None:
        if not store.add_epoch(run_id, row):
            raise _TakenOver(run_id)
        bar.epoch(row)

    try:
        result = train_fn(cfg, out_dir=out, progress=False, on_epoch=on_epoch, resume=True)
    except _TakenOver:
        return _TAKEN_OVER, None
    except (KeyboardInterrupt, DiskFullError):
        _give_back(store, run_id)
        raise
    except Exception:  # noqa: BLE001 - one run's failure is a result; the sweep goes on
        return _record(store, run_id, error=traceback.format_exc())
    return _record(store, run_id, result)


# -- several runs side by side ---------------------------------------------------------------------------

_EVENTS: Any = None  # a worker's queue to the driver (set by _start_worker)


def _start_worker(events: Any, threads: int) -> None:
    """A worker process begins: its queue to the driver, ``threads`` torch threads (one by default)."""
    global _EVENTS
    _EVENTS = events
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # set already in this process
        pass


def _train_in_worker(cfg: RunConfig, out: str, train_fn: TrainFn, cwd: str) -> tuple[str, Any]:
    """One run in a worker: epochs go to the driver as they end; returns ("result", RunResult), ("failed",
    traceback) or ("disk full", message)."""
    import os

    if os.path.isdir(cwd) and os.getcwd() != cwd:  # relative paths in the config mean what they meant to the driver
        os.chdir(cwd)

    def on_epoch(row: dict) -> None:
        _EVENTS.put((cfg.run_id, dict(row)))

    try:
        return "result", train_fn(cfg, out_dir=Path(out), progress=False, on_epoch=on_epoch, resume=True)
    except DiskFullError as exc:
        return "disk full", str(exc)
    except Exception:  # noqa: BLE001 - a result, recorded by the driver
        return "failed", traceback.format_exc()


def _drain(events: Any, store: Store) -> None:
    """Store the epochs the workers sent since the last look."""
    while True:
        try:
            run_id, row = events.get_nowait()
        except queue.Empty:
            return
        store.add_epoch(run_id, row)  # False: taken over meanwhile; the result will not be recorded either


def _run_parallel(store: Store, claims: Claims, job: Any, train_fn: TrainFn, summary: SweepSummary, bar: SweepBar,
                  workers: int, threads: int) -> None:
    """Claim, hand to a worker, collect: at most ``workers`` runs in flight."""
    import os

    from initscope.experiments.data.folder import warm_cache

    for data, root, size, limited in dict.fromkeys((r.data, r.data_root, r.image_size, r.limit is not None)
                                                   for r in job.runs):
        if not limited:
            warm_cache(data, root=root, image_size=size)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads (the store's heartbeat)
    events = ctx.Queue()
    inflight: dict[cf.Future, tuple[RunConfig, str]] = {}
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(events, threads))
    try:
        while True:
            while len(inflight) < workers and (taken := claims.take(wait=not inflight)) is not None:
                i, cfg, _ = taken
                future = start_claimed(store, cfg, job.out, lambda: pool.submit(
                    _train_in_worker, cfg, str(job.out.resolve()), train_fn, os.getcwd()))
                inflight[future] = (cfg, f"{i + 1}/{claims.count} {label(cfg, job.label_keys)}")
            if not inflight:
                break
            bar.running(len(inflight))
            done, _ = cf.wait(list(inflight), timeout=_POLL_S, return_when=cf.FIRST_COMPLETED)
            _drain(events, store)
            for future in done:
                cfg, text = inflight.pop(future)
                try:
                    kind, value = future.result()
                except cf.process.BrokenProcessPool as exc:  # the worker died (killed, out of memory)
                    kind, value = "failed", f"the worker process running this run died ({exc})"
                    if getattr(pool, "_broken", False):  # every run in flight fails with it; a new pool goes on
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                                                      initargs=(events, threads))
                if kind == "disk full":
                    _give_back(store, cfg.run_id)
                    raise DiskFullError(value)
                outcome = _record(store, cfg.run_id, value) if kind == "result" else \
                    _record(store, cfg.run_id, error=value)
                _report(store, cfg, text, outcome, summary, bar)
    except BaseException:
        # Ctrl-C, a full disk or a driver error: stop the workers and give their runs back
        for cfg, _ in inflight.values():
            _give_back(store, cfg.run_id)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
