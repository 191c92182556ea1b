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
engine calls :func:`prepare`: the runs, the checks that their data can be read and their folders
written, in that order, so a sweep that cannot work stops before the database is created.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.data import parse_data
from initscope.experiments.store import DONE, Store, check_output
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

    def line(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.ran.items())) or "none"
        skipped = ", ".join(f"{n} {s}" for s, n in sorted(self.skipped.items())) or "none"
        return (f"{self.total} runs: trained {sum(self.ran.values())} ({ran}); skipped "
                f"{sum(self.skipped.values())} ({skipped}); {self.seconds:.0f} s")

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
        job = SweepJob(runs, Path(db) if db is not None else sweep.db, Path(out) if out is not None else sweep.out,
                       sweep.sweep_id, sweep.to_dict(), name or sweep.name,
                       [k for k, v in sweep.grid.items() if len(v) > 1 or isinstance(v, dict)])
    else:
        runs = list(sweep)
        if db is None:
            raise ValueError("db= is required when the sweep is a list of RunConfigs")
        job = SweepJob(runs, Path(db), Path(out) if out is not None else Path(db).with_suffix(""),
                       hashlib.sha1(",".join(r.run_id for r in runs).encode()).hexdigest()[:12],
                       {"grid": {}, "run": {}}, name, ["data", "model", "method", "optimizer", "lr", "seed"])
    check_data(job.runs)
    check_output(job.out, job.db)  # an unwritable folder or a full disk is an error now, not after the first run
    return job


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

    def finish(self, line: str) -> None:
        """A run ended: print its line and count it."""
        if not self.bar.disable:
            self.bar.console.print(line, highlight=False, markup=False)
        self.bar.advance(self.runs)
