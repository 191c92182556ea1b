"""``initscope train``, ``initscope sweep`` and ``initscope report``: the command-line face of the experiments.

The flags of ``train`` and ``sweep`` are not written here: each command's signature is built from
:data:`~initscope.experiments.config.RUN_SCHEMA` (one flag per RunConfig field, with its type, default
and help, the valid values read from the registries) and, for ``sweep``, from the engines' declared
options. typer reads a callback's signature when it builds the command, so the commands are
:class:`~initscope.cli_common.LiveCommand` objects over bodies that take ``**flags``: a data source or an
engine registered after this module was imported is in the help and the flags all the same.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from initscope.cli_common import LiveCommand, console, error_text, fail
from initscope.experiments.config import PAPER_METHODS, RUN_SCHEMA, RunConfig, SweepConfig, load_toml
from initscope.experiments.config.sweep import AXES, axis_sizes, default_grid
from initscope.experiments.engines import ENGINES, SweepSummary, engine_options

_KW = inspect.Parameter.KEYWORD_ONLY


def _option(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
    # typer reads help as rich markup; these lines quote registries and extras ('initscope[ray]'), whose
    # brackets it would swallow: escaped, they show as written
    return inspect.Parameter(name, _KW, default=typer.Option(default, *flags, help=escape(help)), annotation=annotation)


def _field_flag(name: str, *, sweep: bool) -> inspect.Parameter:
    """The flag of one RunConfig field: ``train`` has its type and default; ``sweep`` the type with None for
    "not given" (the file's value, else RunConfig's default), and a comma-separated list for a grid axis."""
    t, s = RUN_SCHEMA.type_of(name), RUN_SCHEMA.setting(name)
    help = RUN_SCHEMA.describe(name)
    if sweep and name in AXES:
        default = PAPER_METHODS if name == "method" else (RUN_SCHEMA.default(name),)
        return _option(name, Optional[str], None, s.sweep_flag or RUN_SCHEMA.flags(name)[0],
                       help=f"{help} (comma-separated for several; default: {','.join(map(str, default))})")
    flags = (RUN_SCHEMA.flags(name)[0],) if sweep else RUN_SCHEMA.flags(name)
    if t.sequence:  # written as text, read by the schema (30,60)
        return _option(name, Optional[str], None, *flags, help=help)
    if t.base is bool:  # --fixup-scalars/--no-fixup-scalars
        flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
    if sweep or t.optional:
        return _option(name, Optional[t.base], None, *flags, help=help)
    return _option(name, t.base, RUN_SCHEMA.default(name), *flags, help=help)


def _field_value(name: str, value: Any) -> Any:
    """A flag's value as the config takes it (tuples arrive as text)."""
    if value is not None and RUN_SCHEMA.type_of(name).sequence:
        return RUN_SCHEMA.from_text(name, value)
    return value


# -- initscope train ------------------------------------------------------------------------------------


def _train(**flags: Any) -> None:
    """Train one model with one initialization; print the per-epoch history and the test metrics."""
    from initscope.errors import InitscopeError
    from initscope.experiments.data import parse_data
    from initscope.experiments.engines.base import check_devices, check_trainable
    from initscope.experiments.store import check_output
    from initscope.experiments.training import train
    from initscope.threads import torch_threads

    out, progress, resume, threads = (flags.pop(k) for k in ("out", "progress", "resume", "threads"))
    if threads < 0:
        raise fail(f"--threads: {threads} is not a number of threads (0 leaves torch's default)")
    try:
        # a flag left at None (the text flags' "not given") takes the field's default
        config = RunConfig.from_dict({k: _field_value(k, v) for k, v in flags.items() if v is not None})
        check_devices([config])
        check_trainable([config])
        parse_data(config.data).check(config.data_root)  # the data's files: now, not after the model is built
        check_output(out)  # an unwritable folder or a full disk: an error now, not at the first checkpoint
        # On a machine whose cores other processes also use, OpenMP threads spin-waiting on each other can
        # slow every step many times over; one thread each avoids it.
        with torch_threads(threads or None):
            result = train(config, out_dir=out, progress=progress, resume=resume)
    except (InitscopeError, ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        raise fail(exc) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return
    # accuracy in %, as every table and figure of the report gives it (the run records fractions)
    table = Table("epoch", "lr", "train loss", "train acc (%)", "val loss", "val acc (%)", "s",
                  title=f"{config.model} · {config.method} · {config.optimizer} lr {config.lr:g} · {config.data}")
    for h in result.history:
        mark = " *" if h["epoch"] == result.best_epoch else ""
        table.add_row(f"{h['epoch']}{mark}", f"{h['lr']:.3g}", f"{h['train_loss']:.4f}",
                      f"{100 * h['train_accuracy']:.2f}", f"{h['val_loss']:.4f}", f"{100 * h['val_accuracy']:.2f}",
                      f"{h['seconds']:.1f}")
    console.print(table)
    if result.status == "diverged":
        console.print(f"diverged: non-finite loss in epoch {result.diverged_epoch}")
    if result.test:
        t = result.test
        console.print(f"test (best validation epoch {result.best_epoch}): accuracy {100 * t['accuracy']:.2f}%  "
                      f"precision {100 * t['precision']:.2f}%  recall {100 * t['recall']:.2f}%  F1 {100 * t['f1']:.2f}%  "
                      f"loss {t['loss']:.4f}")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"run {result.run_id}: {result.status}; saved under {out / result.run_id}")


def _train_params() -> list[inspect.Parameter]:
    return [_field_flag(name, sweep=False) for name in RUN_SCHEMA.names()] + [
        _option("out", Path, Path("runs"), "--out", help="folder for checkpoints and result.json"),
        _option("progress", bool, True, "--progress/--no-progress", help="show a progress bar"),
        _option("resume", bool, True, "--resume/--no-resume", help="continue a killed run from its last epoch"),
        _option("threads", int, 0, "--threads", help="torch CPU threads (0: torch's default); 1 on a shared machine"),
    ]


train_cmd = LiveCommand(_train, _train_params)


# -- initscope sweep ------------------------------------------------------------------------------------


def _read_sweep(config: Path | None, flags: dict[str, Any]) -> SweepConfig:
    """The sweep of the file (or the default grid), with the flags over it: a grid flag replaces that axis,
    a fixed flag that setting."""
    doc: dict[str, Any] = {"grid": default_grid(), "run": {}} if config is None else load_toml(config)
    if config is not None:
        doc.setdefault("name", config.stem)
    sweep = SweepConfig.from_mapping(doc)
    sweep.override(SweepConfig.from_flags(
        grid={k: flags[k] for k in AXES},
        fixed={k: _field_value(k, flags[k]) for k in RUN_SCHEMA.names() if k not in AXES}))
    return sweep


def _engine_kwargs(engine: str, given: dict[str, Any]) -> dict[str, Any]:
    """The engine options given on the command line, refused when the chosen engine does not take them."""
    if engine not in ENGINES:
        raise fail(f"--engine: unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    takes = ENGINES[engine].option_names()
    foreign = [engine_options()[k].flag for k, v in given.items() if v is not None and k not in takes]
    if foreign:
        mine = ", ".join(engine_options()[k].flag for k in takes) or "no options"
        raise fail(f"{', '.join(foreign)}: not an option of --engine {engine} (it takes {mine})")
    return {k: v for k, v in given.items() if v is not None}


def _sweep(**flags: Any) -> None:
    """Train every combination of data × model × method × optimizer × lr × seed; results go to an
    SQLite database. Run it again to resume: finished and diverged runs are skipped."""
    from initscope.errors import ConfigError, DiskFullError, InitscopeError

    config, db, out, name, report, retry_failed, dry_run, engine = (
        flags.pop(k) for k in ("config", "db", "out", "name", "report", "retry_failed", "dry_run", "engine"))
    options = {k: flags.pop(k) for k in engine_options()}
    try:
        sweep = _read_sweep(config, flags)
        sweep.db, sweep.out, sweep.name = db or sweep.db, out or sweep.out, name or sweep.name
        runs = sweep.expand()
    except (ConfigError, ValueError, TypeError) as exc:
        raise fail(exc) from None
    kwargs = _engine_kwargs(engine, options)
    if dry_run:
        _dry_run(sweep, runs)
        return
    console.print(f"sweep {sweep.name or sweep.sweep_id}: {len(runs)} runs over {axis_sizes(sweep.grid)}; "
                  f"db {sweep.db}; out {sweep.out}")
    try:
        summary = ENGINES[engine].run(sweep, retry_failed=retry_failed, **kwargs)
    except DiskFullError as exc:  # the run was given back: say so, with the file
        raise fail(f"{exc} (the interrupted run was given back)") from None
    except (InitscopeError, FileNotFoundError, ImportError, ValueError) as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        console.print("interrupted: the current run was given back; run the same command again to resume")
        raise typer.Exit(130) from None
    console.print(summary.line())
    if summary.nothing_done:
        _print_first_failure(summary)
        raise typer.Exit(1)
    if report is not None:
        _write(sweep.db, report, None)
    else:
        console.print(f"report: initscope report {sweep.db} --out report")


def _dry_run(sweep: SweepConfig, runs: list[RunConfig]) -> None:
    """List the runs a sweep would train; with ``[select]``, the selection runs, then per group the runs after
    its choice (the choice read from the database where it is made already)."""
    from initscope.experiments.config.select import Select, grid_edge, selection_plan

    keys = list(sweep.grid)
    select = sweep.select if isinstance(sweep.select, Select) else None

    def line(r: RunConfig, note: str = "") -> str:
        d = r.to_dict()
        return f"{r.run_id}  " + " ".join(f"{k}={d[k]}" for k in keys + (["seed"] if select else [])) + note

    if select is None:
        console.print(f"sweep {sweep.name or sweep.sweep_id}: {len(runs)} runs over {axis_sizes(sweep.grid)}; "
                      f"db {sweep.db}; out {sweep.out}")
        for r in runs:
            console.print(line(r))
        return
    groups = selection_plan(select, runs)
    later = (len(select.seeds) - 1) * len(groups)
    console.print(f"sweep {sweep.name or sweep.sweep_id}: {len(runs) + later} runs: {len(runs)} selection runs over "
                  f"{axis_sizes(sweep.grid)} at seed {select.seeds[0]}; {select.axis} chosen per group "
                  f"({len(groups)} groups) by {select.by}; then {later} runs: seeds "
                  f"{', '.join(map(str, select.seeds[1:])) or 'none'} at each group's choice; db {sweep.db}; "
                  f"out {sweep.out}")
    recorded = {k: json.loads(v) for k, v in _read_db(sweep.db, "SELECT group_id, chosen FROM selections").items()}
    scores = {k: json.loads(v) for k, v in _read_db(sweep.db, "SELECT group_id, scores FROM selections").items()}
    done = _read_db(sweep.db, "SELECT run_id, status FROM runs WHERE status IN ('finished', 'diverged')")
    if done:
        planned = {r.run_id for r in runs} | {r.run_id for gid, members in groups.items() if gid in recorded
                                             for r in select.after_choice(next(
                                                 (c for c in members if getattr(c, select.axis) == recorded[gid]),
                                                 members[0]))}
        console.print(f"{len(planned & set(done))} of them done in {sweep.db} already (a sweep skips them)")
    console.print("selection runs:")
    for r in runs:
        console.print(line(r))
    console.print(f"after the choice ({len(select.seeds) - 1} seed(s) per group):")
    for gid, members in groups.items():
        if gid in recorded:
            chosen = next((c for c in members if getattr(c, select.axis) == recorded[gid]), members[0])
            edge = grid_edge({"chosen": recorded[gid], "scores": scores.get(gid, [])})
            note = f"; at the grid's {edge} edge, beating its neighbour: widen the grid" if edge else ""
            for r in select.after_choice(chosen):
                console.print(line(r, f"  (chosen {select.axis}={recorded[gid]}{note})"))
        else:
            what = " ".join(f"{k}={v}" for k, v in members[0].to_dict().items() if k in keys and k != select.axis)
            console.print(f"  {what}: {len(select.seeds) - 1} run(s) at the {select.axis} its selection runs choose "
                          "(not decided yet)")


def _read_db(db: Path, query: str) -> dict[str, Any]:
    """``{first column: second column}`` of a query on a results database; empty where there is none, or the
    database is older than the table, or cannot be read (a dry run changes nothing and fails on nothing)."""
    if not Path(db).is_file():
        return {}
    from initscope.experiments.tables.frames import connect

    try:
        with connect(db) as conn:
            return {r[0]: r[1] for r in conn.execute(query)}
    except Exception:  # noqa: BLE001
        return {}


def _print_first_failure(summary: SweepSummary) -> None:
    if summary.failures:
        run_id, error = summary.failures[0]
        console.print(error_text(f"no run finished; the first failure, run {run_id}:"))
        console.print(error.rstrip(), soft_wrap=True)  # the traceback as it was, lines unbroken
    else:
        console.print(error_text("no run finished: every run had failed before and was not retried "
                                 "(--no-retry-failed); their errors are in the database's runs.error"))


def _sweep_params() -> list[inspect.Parameter]:
    return [
        inspect.Parameter("config", _KW, annotation=Optional[Path], default=typer.Argument(
            None, help="a sweep TOML file (see docs/experiments.md); flags override it")),
        # the grid's axes first (comma-separated lists), then the settings every run shares
        *[_field_flag(name, sweep=True) for name in sorted(RUN_SCHEMA.names(), key=lambda n: n not in AXES)],
        _option("db", Optional[Path], None, "--db", help="the results database (default: runs.db)"),
        _option("out", Optional[Path], None, "--out", help="folder for the runs' files (default: runs)"),
        _option("name", Optional[str], None, "--name", help="the sweep's name in the database"),
        _option("report", Optional[Path], None, "--report", help="write the report to this folder afterwards"),
        _option("retry_failed", bool, True, "--retry-failed/--no-retry-failed", help="train failed runs again"),
        _option("dry_run", bool, False, "--dry-run", help="list the runs and exit"),
        _option("engine", str, "local", "--engine",
                help="what runs the runs: " + "; ".join(f"{e.name}: {e.summary}" for e in ENGINES.values())),
        *[_option(o.name, Optional[o.type], None, o.flag,
                  help=f"{', '.join(e.name for e in ENGINES.values() if o.name in e.option_names())}: {o.help}")
          for o in engine_options().values()],
    ]


sweep_cmd = LiveCommand(_sweep, _sweep_params)


# -- initscope report -----------------------------------------------------------------------------------


def report_cmd(
    db: Path = typer.Argument(..., help="a results database written by `initscope sweep`"),
    out: Path = typer.Option(Path("report"), "--out", help="folder for report.md, report.html, CSVs, figures"),
    title: Optional[str] = typer.Option(None, "--title"),
    where: Optional[list[str]] = typer.Option(None, "--where", help="keep runs with KEY=V1,V2 (repeatable), e.g. optimizer=adam"),
    probes: Optional[Path] = typer.Option(None, "--probes", help="a folder of <run_id>.parquet probe tables, for runs "
                                          "whose folders are not where the database says (a database from another machine)"),
) -> None:
    """Render the papers' tables (Markdown, HTML, CSV) and the training curves from a results database."""
    selected: dict[str, list[str]] = {}
    for item in where or []:
        key, eq, values = item.partition("=")
        if not eq or not key.strip() or not values.strip():
            raise fail(f"--where {item!r}: write it as KEY=VALUE[,VALUE...], e.g. optimizer=adam")
        selected[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    _write(db, out, title, selected, probes)


def _write(db: Path, out: Path, title: Optional[str], where: Optional[dict[str, list[str]]] = None,
           probes: Optional[Path] = None) -> None:
    from initscope.errors import InitscopeError
    from initscope.experiments.tables import write_report
    from initscope.fileio import disk_error

    try:
        rep = write_report(db, out, title=title, where=where, probes=probes)
    except (InitscopeError, FileNotFoundError, ValueError) as exc:
        raise fail(exc) from None
    except OSError as exc:  # a file of the report that could not be written: which one, and why
        raise fail(disk_error(exc, exc.filename or out)) from None
    c = rep.summary["counts"]
    console.print(f"{rep.summary['total']} runs ({c['finished']} finished, {c['diverged']} diverged, "
                  f"{c['failed']} failed, {c['running']} running); wrote {out / 'report.html'}, "
                  f"{out / 'report.md'}, {len(rep.tables)} CSV tables, {len(rep.figures)} figures")
    for t in rep.tables:
        console.print(f"\n{t.title}\n{t.markdown()}")
