"""Engines: what runs a sweep's runs. The registry, the one signature every engine has, and what they share.

An engine is a function registered with :func:`register_engine`::

    @register_engine("local", summary="one run after another, in this process",
                     options=(EngineOption("threads", int, "torch CPU threads during the sweep"),))
    def run_sweep(sweep, *, db=None, out=None, train_fn=None, progress=True, retry_failed=True,
                  lease_s=DEFAULT_LEASE_S, name=None, threads=None) -> SweepSummary: ...

Every engine takes the same leading arguments (a :class:`SweepConfig` or a list of RunConfigs, the
database, the run folders, the train function, and so on) and returns a :class:`SweepSummary`; what
only one engine understands (the local engine's ``threads``, Ray's ``address``) it declares as
:class:`EngineOption`\\s, which ``initscope sweep`` turns into flags. Before it trains anything an
engine calls :func:`prepare`: the runs, the checks that they can train at all (:func:`check_trainable`),
that their data can be read and their folders written, in that order, so a sweep that cannot work
stops before the database is created. Then it takes the runs through :class:`Claims`, which skips what
the store holds as done or owned and comes back once to runs whose owner only a heartbeat can vouch for.

A sweep with ``[select]`` (:mod:`initscope.experiments.config.select`) starts with its selection runs;
:meth:`SweepJob.after_choices`, which :class:`Claims` asks whenever it has nothing left to hand out,
decides each group whose selection runs are all done (recording the choice in the store) and adds the
runs of the other seeds at the chosen value. Every engine runs the protocol that way, and resumes it.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initscope.errors import ConfigError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.config.select import Select, selection_plan
from initscope.experiments.data import parse_data
from initscope.experiments.store import DONE, Claim, Store, check_output
from initscope.progress import progress_bar
from initscope.registry import Registry

TrainFn = Callable[..., Any]


@dataclass
class SweepSummary:
    """What one call of an engine did.

    Attributes:
        total: runs in the sweep.
        ran: runs this call trained, by final status (``finished``, ``diverged``, ``failed``).
        skipped: runs it did not train, by reason (``finished``, ``diverged``, ``failed`` when not
            retried, ``owned`` when another live sweep has it).
        failures: ``(run_id, error)`` of each run that failed in this call, the error in full.
        seconds: wall time of this call.
    """

    db: Path
    out: Path
    total: int
    ran: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    waiting_groups: int = 0  # [select] groups left undecided: a selection run failed or is held elsewhere

    def line(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.ran.items())) or "none"
        skipped = ", ".join(f"{n} {s}" for s, n in sorted(self.skipped.items())) or "none"
        waiting = (f"; {self.waiting_groups} selection group(s) undecided (a selection run failed or another sweep "
                   "holds it): run the same command again") if self.waiting_groups else ""
        return (f"{self.total} runs: trained {sum(self.ran.values())} ({ran}); skipped "
                f"{sum(self.skipped.values())} ({skipped}); {self.seconds:.0f} s{waiting}")

    @property
    def nothing_done(self) -> bool:
        """Runs failed and none is done: none finished or diverged, now or before (a sweep to exit non-zero on)."""
        failed = self.ran["failed"] + self.skipped["failed"]
        return failed > 0 and not any(self.ran[s] + self.skipped[s] for s in DONE)


# -- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOption:
    """A keyword argument only some engines take; ``initscope sweep`` gives it the flag ``--name``."""

    name: str
    type: type
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Engine:
    """A registered engine: its name, a line of help, the function that runs a sweep, its own options."""

    name: str
    summary: str
    run: Callable[..., SweepSummary]
    options: tuple[EngineOption, ...] = ()

    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)


ENGINES: Registry[Engine] = Registry("engine")


def register_engine(name: str, *, summary: str, options: Sequence[EngineOption] = (),
                    overwrite: bool = False) -> Callable[[Callable[..., SweepSummary]], Callable[..., SweepSummary]]:
    """Register the decorated function as the engine ``name`` (a name taken already raises ``ValueError``
    unless ``overwrite``); it must take the arguments every engine takes (see the module docstring) and
    the ``options`` it declares."""

    def decorate(run: Callable[..., SweepSummary]) -> Callable[..., SweepSummary]:
        ENGINES.add(name, Engine(name, summary, run, tuple(options)), overwrite=overwrite)
        return run

    return decorate


def engine_options() -> dict[str, EngineOption]:
    """Every registered engine's options by name (the ``initscope sweep`` flags they become)."""
    out: dict[str, EngineOption] = {}
    for engine in ENGINES.values():
        for o in engine.options:
            out.setdefault(o.name, o)
    return out


# -- what every engine does before it trains ---------------------------------------------------------------


@dataclass
class SweepJob:
    """A sweep made ready to run: its runs, where results go, and what the store records about it."""

    runs: list[RunConfig]
    db: Path
    out: Path
    sweep_id: str
    grid: dict[str, Any]
    name: str | None
    label_keys: list[str]
    select: Select | None = None
    followed: set[str] = field(default_factory=set)  # [select] groups whose runs after the choice are planned
    groups: dict[str, list[RunConfig]] = field(init=False)  # the selection runs by group ({} without [select])

    def __post_init__(self) -> None:
        self.groups = selection_plan(self.select, self.runs) if self.select is not None else {}

    def after_choices(self, store: Store) -> list[RunConfig]:
        """The runs that became known since the last call: for each ``[select]`` group whose selection runs
        are all done, its choice (decided now and recorded, or read from the store) and the runs of the other
        seeds at it. They are appended to :attr:`runs` and to the sweep's record in the store."""
        if self.select is None:
            return []
        new: list[RunConfig] = []
        for gid, candidates in self.groups.items():
            if gid in self.followed:
                continue
            chosen = self.choice(store, gid, candidates, decide=True)
            if chosen is None:
                continue
            self.followed.add(gid)
            known = {r.run_id for r in self.runs}
            new += [r for r in self.select.after_choice(chosen) if r.run_id not in known]
        if new:
            self.runs.extend(new)
            store.add_sweep_runs(self.sweep_id, [r.run_id for r in new])
        return new

    def choice(self, store: Store, gid: str, candidates: list[RunConfig], *, decide: bool) -> RunConfig | None:
        """The selection run at the group's chosen value: recorded, or (``decide``) decided now when every
        candidate is done; None while it cannot be."""
        axis = self.select.axis
        recorded = store.selection(gid)
        if recorded is None:
            rows = [store.run(c.run_id) for c in candidates]
            if not decide or any(r is None or r["status"] not in DONE for r in rows):
                return None
            value, scores = self.select.choose([(getattr(c, axis), r["best_val_accuracy"])
                                                for c, r in zip(candidates, rows)])
            for entry, c in zip(scores, candidates):
                entry["run_id"] = c.run_id
            recorded = store.decide(gid, axis=axis, by=self.select.by, group=self.select.group(candidates[0]),
                                    chosen=value, scores=scores, sweep_id=self.sweep_id)
        return next((c for c in candidates if getattr(c, axis) == recorded["chosen"]), None)

    def undecided(self) -> int:
        """How many ``[select]`` groups have no choice yet."""
        return len(self.groups) - len(self.followed)


def check_trainable(runs: Sequence[RunConfig]) -> None:
    """Refuse, before anything is claimed, runs that cannot train whatever their data: batches of one
    sample through BatchNorm (:func:`~initscope.experiments.training.loop.check_batch_size`). The model is
    built only for runs with a batch (or a train split) of one; a model that does not build is left to the
    run, which reports it."""
    from initscope.experiments.training.loop import build_model, check_batch_size

    built: set[tuple] = set()
    for cfg in runs:
        key = (cfg.model, cfg.width, cfg.norm, cfg.head)
        if (cfg.batch_size > 1 and cfg.limit != 1) or key in built:
            continue
        built.add(key)
        try:
            model = build_model(cfg, 3, 10)  # channels and classes do not change where BatchNorm is
        except Exception:  # noqa: BLE001 - the run itself says why its model does not build
            continue
        check_batch_size(cfg, model)


def check_devices(runs: Sequence[RunConfig]) -> None:
    """Refuse, before anything is claimed, runs whose device this machine does not have (the local engine
    and ``initscope train``; a Ray cluster's GPUs are checked by the Ray engine).

    Raises:
        ConfigError: naming the device, the run, and what this machine has.
    """
    import torch

    for device in dict.fromkeys(r.device for r in runs):
        if device.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(device.partition(":")[2] or 0)
            if index >= n:
                has = f"{n} CUDA GPU(s)" if n else "no CUDA GPU (torch.cuda.is_available() is False)"
                raise ConfigError(f"device: {device!r} but this machine has {has}; use --device cpu or auto")
        elif device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device: 'mps' but this machine has no Apple GPU that torch can use; use --device cpu "
                              "or auto")


def check_data(runs: Sequence[RunConfig]) -> None:
    """Each data source of ``runs`` can be read (its folder exists, its files are there), checked once per
    (data, data_root): an error now, not in every run."""
    for data, root in dict.fromkeys((r.data, r.data_root) for r in runs):
        parse_data(data).check(root)


def prepare(sweep: SweepConfig | Sequence[RunConfig], *, db: str | Path | None, out: str | Path | None,
            name: str | None) -> SweepJob:
    """The runs of ``sweep`` with their database and folders (a SweepConfig's ``db`` and ``out`` unless
    given), checked: the data can be read, the folders written. Nothing is created when a check fails
    but the folders themselves."""
    if isinstance(sweep, SweepConfig):
        runs = sweep.expand()
        select = sweep.select if isinstance(sweep.select, Select) else None
        keys = [k for k, v in sweep.grid.items() if len(v) > 1 or isinstance(v, dict)]
        if select is not None and len(select.seeds) > 1:
            keys.append("seed")
        job = SweepJob(runs, Path(db) if db is not None else sweep.db, Path(out) if out is not None else sweep.out,
                       sweep.sweep_id, sweep.to_dict(), name or sweep.name, keys, select)
    else:
        runs = list(sweep)
        if db is None:
            raise ValueError("db= is required when the sweep is a list of RunConfigs")
        job = SweepJob(runs, Path(db), Path(out) if out is not None else Path(db).with_suffix(""),
                       hashlib.sha1(",".join(r.run_id for r in runs).encode()).hexdigest()[:12],
                       {"grid": {}, "run": {}}, name, ["data", "model", "method", "optimizer", "lr", "seed"])
    check_trainable(job.runs)
    check_data(job.runs)
    check_output(job.out, job.db)  # an unwritable folder or a full disk is an error now, not after the first run
    return job


# The longest a sweep waits, after its other runs, to see whether the owner of a run elsewhere still
# beats its heartbeat; an owner that beats more slowly than this allows is left alone.
MAX_OWNER_WAIT_S = 180.0


class Claims:
    """A sweep's runs, claimed in order one at a time.

    A run the store holds as done, failed (without ``retry_failed``) or owned by a live sweep is skipped
    (counted in ``summary.skipped``, the bar advanced). A run owned by a process this machine cannot check
    (another host or container) whose heartbeat is still fresh is put off: once the other runs are
    claimed, the sweep waits until that heartbeat would be stale (at most :data:`MAX_OWNER_WAIT_S`) and
    asks once more. An owner that beat meanwhile keeps its run; one that is gone (a container restarted
    under this very sweep) loses it to this sweep.

    Args:
        store, runs, retry_failed: what to claim, where.
        summary, bar: where skips are counted and shown.
        sleep: how to wait (time.sleep).
    """

    def __init__(self, store: Store, runs: Sequence[RunConfig], *, retry_failed: bool, summary: SweepSummary,
                 bar: "SweepBar", sleep: Callable[[float], None] = time.sleep,
                 more: Callable[[], list[RunConfig]] | None = None) -> None:
        self.store, self.retry_failed, self.summary, self.bar, self.sleep = store, retry_failed, summary, bar, sleep
        self.pending = list(enumerate(runs))
        self.count = len(self.pending)
        self.deferred: list[tuple[float, int, RunConfig]] = []  # (retry_at, index, config)
        self.put_off: set[str] = set()
        self.more = more

    def _refill(self) -> None:
        """With nothing pending, ask ``more`` for runs that became known (a [select] choice)."""
        if self.pending or self.more is None:
            return
        new = self.more()
        self.pending.extend((self.count + k, cfg) for k, cfg in enumerate(new))
        self.count += len(new)
        self.summary.total += len(new)
        self.bar.grow(len(new))

    @property
    def exhausted(self) -> bool:
        """No run is left to hand out, now or after the choices the runs done so far allow."""
        self._refill()
        return not self.pending and not self.deferred

    def due_in(self) -> float:
        """Seconds until the first put-off run may be asked again (0 when one is due, or none waits)."""
        return max(0.0, min((t for t, _, _ in self.deferred), default=0.0) - time.time())

    def take(self, *, wait: bool = True) -> tuple[int, RunConfig, Claim] | None:
        """The next run this sweep now owns, as ``(index, config, claim)``; None when no run is left, or
        (with ``wait=False``) when only put-off runs are left and none is due yet."""
        while True:
            self._refill()
            if not self.pending:
                if not self.deferred:
                    return None
                if self.due_in() > 0:
                    if not wait:
                        return None
                    self.bar.waiting(len(self.deferred), self.due_in())
                    self.sleep(self.due_in())
                self.deferred.sort(key=lambda d: d[0])
                _, i, cfg = self.deferred.pop(0)
                self.pending.insert(0, (i, cfg))
            i, cfg = self.pending.pop(0)
            claim = self.store.claim(cfg.run_id, cfg.to_dict(), retry_failed=self.retry_failed)
            if claim.taken:
                return i, cfg, claim
            if (claim.retry_at is not None and cfg.run_id not in self.put_off
                    and claim.retry_at - time.time() <= MAX_OWNER_WAIT_S):
                self.put_off.add(cfg.run_id)
                self.deferred.append((claim.retry_at + 0.5, i, cfg))  # a moment past stale: no race at the edge
                continue
            self.summary.skipped[claim.reason] += 1
            self.bar.skip()


def start_claimed(store: Store, cfg: RunConfig, out: Path, start: Callable[[], Any]) -> Any:
    """Hand a run this sweep claimed to ``start`` (a worker process, a Ray task) and return what it gives; a
    run that could not be started is given back, so that the next sweep takes it."""
    store.set_run_dir(cfg.run_id, out / cfg.run_id)
    try:
        return start()
    except BaseException:
        store.release(cfg.run_id)
        raise


def default_train() -> TrainFn:
    from initscope.experiments.training import train

    return train


def label(cfg: RunConfig, keys: Sequence[str]) -> str:
    """A run's line in the progress output: the values of the grid's varying keys."""
    d = cfg.to_dict()
    return " ".join(f"{k}={d[k]}" if k in ("lr", "seed") else str(d[k]) for k in keys if k in d) or cfg.run_id


def result_note(store: Store, run_id: str) -> str:
    """What the store holds about a run that just ended, in a few words (its error's last line, the
    epoch it diverged in, or its accuracies)."""
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


class SweepBar:
    """A sweep's progress: a bar over runs (finished or skipped), with, where the engine follows one run at
    a time, a second bar over that run's epochs; a line per ended run. Silent when disabled."""

    def __init__(self, enabled: bool, total: int, *, title: str = "runs", epochs: bool = True) -> None:
        self.bar = progress_bar(enabled=enabled)
        self.title = title
        self.runs = self.bar.add_task(title, total=total)
        self.epochs = self.bar.add_task("  epochs", total=1, visible=False) if epochs else None

    def __enter__(self) -> "SweepBar":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def skip(self) -> None:
        self.bar.advance(self.runs)

    def grow(self, n: int) -> None:
        """``n`` more runs to do (the runs after a [select] choice)."""
        if n:
            total = next(t.total for t in self.bar.tasks if t.id == self.runs) or 0
            self.bar.update(self.runs, total=total + n)

    def start(self, description: str, epochs: int) -> None:
        """A run begins: the runs bar names it, the epochs bar starts over."""
        self.bar.update(self.runs, description=description)
        if self.epochs is not None:
            self.bar.reset(self.epochs, total=max(1, int(epochs)), visible=True, description="  epochs")

    def epoch(self, row: dict) -> None:
        if self.epochs is not None:
            val = row.get("val_accuracy")
            note = f"  epoch {row.get('epoch')}" + (f" · val acc {100 * val:.1f}%" if isinstance(val, float) else "")
            self.bar.update(self.epochs, advance=1, description=note)

    def running(self, n: int) -> None:
        """How many runs are in flight (engines that run several at once)."""
        self.bar.update(self.runs, description=f"{self.title} ({n} running)")

    def waiting(self, n: int, seconds: float) -> None:
        """The sweep waits to see whether the owners of ``n`` runs elsewhere are alive."""
        self.bar.update(self.runs, description=f"{self.title}: waiting {seconds:.0f} s for the heartbeat of {n} "
                                               "run(s) another process holds")

    def finish(self, line: str) -> None:
        """A run ended: print its line and count it."""
        if not self.bar.disable:
            self.bar.console.print(line, highlight=False, markup=False)
        self.bar.advance(self.runs)
