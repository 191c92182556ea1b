"""The Ray engine: a sweep's runs as Ray tasks, on a local Ray or on a cluster, one results store.

Each run the store lets this sweep claim becomes one Ray task that asks for the resources the run
declares (``cpus_per_run`` CPUs; a GPU when the run's device is CUDA, or ``auto`` on a cluster that has
GPUs). The driver (the process that called :func:`run_sweep_ray`) is the only writer of the SQLite
file: a worker sends its events (attempt started, epoch done) through a Ray queue and returns its
:class:`RunResult`; the driver stores each epoch as it arrives and the result when the task ends. So
workers on other nodes never open the database, and the claim in the store (one ``BEGIN IMMEDIATE``
transaction, see :mod:`initscope.experiments.store.sqlite`) decides, as for the local engine, that a finished
run is never run again and that two sweeps on one database never run one run twice.

A worker lost mid-run (the process killed, the node gone) is retried by Ray up to ``max_retries``
times; every attempt announces itself, so the driver counts it in the run's ``attempts`` and writes a
line to its ``notes`` (``"ray attempt 2 on HOST (worker pid P): previous worker lost, retried"``). The
retry resumes from the run's last epoch checkpoint when ``out`` is on storage every node sees (a
shared file system on a cluster; always on a local Ray). A run whose workers were all lost, or whose
train function raised, is stored ``failed`` with the error, and the sweep goes on.

The claim is taken only when a run is about to be submitted, with no more runs in flight than the
cluster can run at once, so a second sweep (local or Ray) on the same database shares the work
instead of finding it all reserved.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from initscope.errors import ConfigError, DiskFullError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.engines.base import (Claims, EngineOption, SweepBar, SweepSummary, TrainFn, default_train,
                                                label, prepare, register_engine, result_note, start_claimed)
from initscope.experiments.store import DEFAULT_LEASE_S, Store
from initscope.threads import torch_threads

# Seconds the driver waits for a task to end before it looks at the event queue again.
_POLL_S = 0.5


def _import_ray() -> Any:
    try:
        import ray  # the Ray package (imports are absolute: this module is initscope's engines.ray)
    except ImportError as exc:
        raise ImportError("the Ray engine needs Ray: pip install 'initscope[ray]' (or pip install 'ray[default]')") from exc
    return ray


def _run_on_worker(config: Any, out: str, train_fn: TrainFn, events: Any, threads: int, cwd: str) -> Any:
    """One run inside a Ray worker: announce the attempt, train with epochs streamed to the driver, return the result."""
    if os.path.isdir(cwd):  # relative paths in the config (folder:PATH, data_root) mean what they meant to the driver
        os.chdir(cwd)
    run_id = config.run_id
    events.put({"run_id": run_id, "event": "start", "host": socket.gethostname(), "pid": os.getpid()})

    def on_epoch(row: dict) -> None:
        # put() waits for the queue to take the row: every epoch is with the driver before the task returns
        events.put({"run_id": run_id, "event": "epoch", "row": dict(row)})

    with torch_threads(max(1, threads)):  # a run's threads are the CPUs it asked Ray for
        return train_fn(config, out_dir=Path(out), progress=False, on_epoch=on_epoch, resume=True)


def _gpus_for(config: Any, gpus_per_run: float | None, cluster_gpus: float) -> float:
    if gpus_per_run is not None:
        return float(gpus_per_run)
    device = str(getattr(config, "device", "auto"))
    if device.startswith("cuda"):
        return 1.0
    return 1.0 if device == "auto" and cluster_gpus > 0 else 0.0


@register_engine("ray", summary="each run a Ray task, on a local Ray or a cluster (needs Ray: pip install "
                                "'initscope[ray]')",
                 options=(EngineOption("address", str, "an existing Ray cluster (auto, host:6379, ray://host:10001); "
                                                       "default: a local Ray"),
                          EngineOption("cpus_per_run", float, "CPUs each run asks Ray for (default 1)"),
                          EngineOption("gpus_per_run", float, "GPUs each run asks Ray for (default: 1 for a run on "
                                                              "CUDA)")))
def run_sweep_ray(
    sweep: SweepConfig | Sequence[RunConfig],
    *,
    db: str | Path | None = None,
    out: str | Path | None = None,
    train_fn: TrainFn | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    name: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: float | None = None,
    max_retries: int = 3,
    init_kwargs: dict[str, Any] | None = None,
) -> SweepSummary:
    """Run every run of ``sweep`` that the store does not already hold as done, each as a Ray task.

    Args:
        sweep: a :class:`SweepConfig` (its ``db`` and ``out`` are the defaults) or a list of RunConfigs.
        db: the results database (written by this process only).
        out: the runs' folders (``out/run_id``); on a cluster, a path every node can write.
        train_fn: ``train(config, *, out_dir, progress, on_epoch, resume) -> RunResult``, shipped to the
            workers (it must pickle); the real one by default.
        progress: a progress bar over runs.
        retry_failed: train runs the store holds as ``failed`` again.
        lease_s: a ``running`` run without a heartbeat for this long is taken over.
        name: the sweep's name in the store.
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
            starts a local Ray (unless this process is already connected to one, which is then used).
        num_cpus: CPUs of the local Ray (None: all of this machine's); ignored with ``address``.
        cpus_per_run: CPUs each task asks for (and torch threads it uses).
        gpus_per_run: GPUs each task asks for; None: 1 for a run on ``cuda``, or on ``auto`` where the
            cluster has GPUs, else 0.
        max_retries: how many times Ray re-runs a task whose worker died (not one whose code raised).
        init_kwargs: more keyword arguments for ``ray.init``.

    Returns:
        A :class:`SweepSummary`, as the local engine's :func:`~initscope.experiments.engines.local.run_sweep` gives.
    """
    # nan passes every comparison: check that each is a finite positive number, before Ray starts
    if isinstance(cpus_per_run, bool) or not isinstance(cpus_per_run, (int, float)) or not (
            math.isfinite(cpus_per_run) and cpus_per_run > 0):
        raise ConfigError(f"cpus_per_run must be > 0 and finite (--cpus-per-run, e.g. 1 or 0.5), got {cpus_per_run!r}")
    if gpus_per_run is not None and (isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, (int, float))
                                     or not (math.isfinite(gpus_per_run) and gpus_per_run >= 0)):
        raise ConfigError(f"gpus_per_run must be >= 0 and finite (--gpus-per-run, e.g. 1 or 0.5), got {gpus_per_run!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    job = prepare(sweep, db=db, out=out, name=name)  # before any worker starts
    ray = _import_ray()
    train_fn = train_fn or default_train()
    started_here = not ray.is_initialized()
    if started_here:
        kw: dict[str, Any] = dict(init_kwargs or {})
        if address is None:  # a local Ray of our own: no dashboard (a cluster keeps its own settings)
            kw.setdefault("include_dashboard", False)
            if num_cpus is not None:
                kw["num_cpus"] = int(num_cpus)
        ray.init(address=address, **kw)
    summary = SweepSummary(db=job.db, out=job.out, total=len(job.runs))
    start = time.perf_counter()
    try:
        with Store(job.db, lease_s=lease_s) as store:
            store.add_sweep(job.sweep_id, job.name, job.grid, [r.run_id for r in job.runs])
            _drive(ray, store, job.runs, job.out, train_fn, summary, job.label_keys, progress=progress,
                   retry_failed=retry_failed, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                   max_retries=max_retries, more=lambda: job.after_choices(store))
            summary.waiting_groups = job.undecided()
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


def _drive(ray: Any, store: Store, runs: list[RunConfig], out: Path, train_fn: TrainFn, summary: SweepSummary,
           label_keys: Sequence[str], *, progress: bool, retry_failed: bool, cpus_per_run: float,
           gpus_per_run: float | None, max_retries: int, more: Any = None) -> None:
    """Claim, submit, collect: at most as many runs in flight as the cluster can run at once."""
    from ray.util.queue import Queue

    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    if cpus_per_run > cluster_cpus:  # such a task would wait forever
        raise ConfigError(f"cpus_per_run={cpus_per_run:g} but the Ray cluster has {cluster_cpus:g} CPUs")
    # every run's GPUs checked before any is claimed: a refusal leaves nothing "running" behind
    gpus_of = {cfg.run_id: _gpus_for(cfg, gpus_per_run, cluster_gpus) for cfg in runs}
    for cfg in runs:
        if gpus_of[cfg.run_id] > cluster_gpus:
            raise ConfigError(f"run {cfg.run_id} (device {cfg.device!r}) asks for {gpus_of[cfg.run_id]:g} GPU(s); the "
                              f"Ray cluster has {cluster_gpus:g}: use --gpus-per-run 0 or --device cpu")
    width = max(1, math.floor(cluster_cpus / cpus_per_run + 1e-9))
    events = Queue(actor_options={"num_cpus": 0})  # holds no CPU: every CPU is for the runs
    task = ray.remote(_run_on_worker)
    inflight: dict[Any, tuple[Any, str]] = {}  # ObjectRef -> (config, label)
    attempts: Counter = Counter()  # attempts started in this sweep, by run
    claimed: dict[str, int] = {}  # the store's attempt count when this sweep claimed the run
    with SweepBar(progress, len(runs), title="runs (ray)", epochs=False) as bar:
        claims = Claims(store, runs, retry_failed=retry_failed, summary=summary, bar=bar, more=more)
        try:
            while not claims.exhausted or inflight:
                # claim only what can start now; with nothing in flight, wait for a put-off run to be due
                while len(inflight) < width and (taken := claims.take(wait=not inflight)) is not None:
                    i, cfg, claim = taken
                    claimed[cfg.run_id] = claim.attempts
                    gpus = gpus_of.get(cfg.run_id, _gpus_for(cfg, gpus_per_run, cluster_gpus))  # or a [select] run
                    if gpus > 0:
                        width = max(1, min(width, math.floor(cluster_gpus / gpus + 1e-9)))
                    ref = start_claimed(store, cfg, out, lambda: task.options(
                        num_cpus=cpus_per_run, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False,
                        name=f"initscope-run-{cfg.run_id}").remote(
                        cfg, str(out.resolve()), train_fn, events, max(1, int(cpus_per_run)), os.getcwd()))
                    inflight[ref] = (cfg, f"{i + 1}/{claims.count} {label(cfg, label_keys)}")
                if not inflight:
                    continue
                bar.running(len(inflight))
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_POLL_S)
                _drain(events, store, attempts, claimed)
                for ref in ready:
                    cfg, text = inflight.pop(ref)
                    status = _collect(ray, store, ref, cfg, attempts[cfg.run_id], max_retries, summary)
                    if status == _TAKEN_OVER:
                        summary.skipped[status] += 1
                        bar.finish(f"{status:<8} {text}  (another sweep took it over while this one was paused)")
                        continue
                    summary.ran[status] += 1
                    bar.finish(f"{status:<8} {text}" + result_note(store, cfg.run_id))
        except BaseException:
            # Ctrl-C or a driver error: stop the tasks and give their runs back, as the local engine does
            for ref, (cfg, _) in inflight.items():
                ray.cancel(ref, force=True)
                store.release(cfg.run_id)
            raise


def _drain(events: Any, store: Store, attempts: Counter, claimed: dict[str, int]) -> None:
    """Store what the workers sent since the last look: attempt starts (retries) and finished epochs."""
    from ray.util.queue import Empty

    while True:
        try:
            ev = events.get_nowait()
        except Empty:
            return
        run_id = ev["run_id"]
        if ev["event"] == "start":
            attempts[run_id] += 1
            n = attempts[run_id]
            where = f"ray attempt {claimed.get(run_id, 1) + n - 1} on {ev['host']} (worker pid {ev['pid']})"
            # the claim counted the first attempt; a later one is Ray re-running the task after a lost worker
            store.add_note(run_id, where if n == 1 else f"{where}: previous worker lost, retried", new_attempt=n > 1)
        elif ev["event"] == "epoch":
            store.add_epoch(run_id, ev["row"])


def _collect(ray: Any, store: Store, ref: Any, cfg: RunConfig, attempts: int, max_retries: int,
             summary: SweepSummary) -> str:
    """Record a finished task: its result, or ``failed`` with why; returns the run's final status."""
    from ray.exceptions import RayTaskError

    try:
        result = ray.get(ref)
    except RayTaskError as exc:  # the train function raised: a result, as in the local engine
        if isinstance(getattr(exc, "cause", None), DiskFullError):  # not the run's fault: give it back, stop
            store.release(cfg.run_id)
            raise exc.cause from None
        if not store.fail(cfg.run_id, str(exc)):
            return _TAKEN_OVER
        summary.failures.append((cfg.run_id, str(exc)))
        return "failed"
    except Exception as exc:  # noqa: BLE001 - workers lost beyond the retries, node gone, cancelled
        text = (f"{type(exc).__name__}: the run's worker was lost on each of its {max(attempts, 1)} attempt(s) "
                f"(max_retries={max_retries})\n{traceback.format_exception_only(exc)[-1].strip()}")
        store.add_note(cfg.run_id, f"gave up after {max(attempts, 1)} attempt(s): {type(exc).__name__}")
        if not store.fail(cfg.run_id, text):
            return _TAKEN_OVER
        summary.failures.append((cfg.run_id, text))
        return "failed"
    if result.status == "failed" and not result.error:
        result.error = "train() returned status 'failed' without an error message"
    if not store.finish(result):
        return _TAKEN_OVER
    if result.status == "failed":
        summary.failures.append((cfg.run_id, result.error))
    return result.status


_TAKEN_OVER = "taken over"  # another sweep holds the run now (this driver was paused past its heartbeat)
