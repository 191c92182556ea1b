"""``initscope sweep`` and ``initscope report``: the command-line face of sweeps and the results store."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

console = Console(highlight=False)
if not console.is_terminal:  # captured: keep lines whole
    console.width = 200

PAPER_METHODS = "xavier,kaiming-forward,kaiming-backward,asv-forward,asv-backward"


def _error(msg: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}", markup=True)
    return typer.Exit(code)


def sweep_cmd(
    config: Optional[Path] = typer.Argument(None, help="a sweep TOML file (see docs/experiments.md); flags override it"),
    data: Optional[str] = typer.Option(None, "--data", help="digits, synthetic, mnist, fashion-mnist, cifar10, cifar100, folder:PATH (comma-separated for several) (default: digits)"),
    model: Optional[str] = typer.Option(None, "--model", help="model name(s), comma-separated (default: plain34)"),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"comma-separated (default: {PAPER_METHODS})"),
    optimizers: Optional[str] = typer.Option(None, "--optimizers", help="comma-separated: sgd, sgd-nesterov, adadelta, adagrad, rmsprop, adam, adamw (default: adam)"),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="learning rates, comma-separated (default: 1e-3)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated (default: 0)"),
    width: Optional[int] = typer.Option(None, "--width", help="base width of initscope's nets"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    norm: Optional[str] = typer.Option(None, "--norm", help="default or none (BatchNorm-free)"),
    head: Optional[str] = typer.Option(None, "--head", help="default or paper (256-unit head)"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, step or cosine"),
    limit: Optional[int] = typer.Option(None, "--limit", help="keep this many training images"),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="where mnist, fashion-mnist, cifar lie"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda"),
    probe_every: Optional[int] = typer.Option(None, "--probe-every", help="probe the layers every N training steps (0: off); the report draws the probe figures"),
    db: Optional[Path] = typer.Option(None, "--db", help="the results database (default: runs.db)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the runs' files (default: runs)"),
    name: Optional[str] = typer.Option(None, "--name", help="the sweep's name in the database"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the report to this folder afterwards"),
    retry_failed: bool = typer.Option(True, "--retry-failed/--no-retry-failed", help="train failed runs again"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is often fastest on a shared machine)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and exit"),
    engine: str = typer.Option("local", "--engine", help="local (one run after another, here) or ray (each run a Ray task; pip install 'initscope[ray]')"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: an existing cluster (auto, host:6379, ray://host:10001) (default: a local Ray)"),
    cpus_per_run: float = typer.Option(1.0, "--cpus-per-run", help="ray: CPUs each run asks for"),
    gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run", help="ray: GPUs each run asks for (default: 1 for a run on CUDA)"),
) -> None:
    """Train every combination of data × model × method × optimizer × lr × seed; results go to an
    SQLite database. Run it again to resume: finished and diverged runs are skipped."""
    from initscope.experiments.runner import run_sweep
    from initscope.experiments.sweep import SweepConfig, SweepConfigError

    grid_flags = {"data": data, "model": model, "method": methods, "optimizer": optimizers, "lr": lrs, "seed": seeds}
    fixed_flags = {"width": width, "epochs": epochs, "batch_size": batch_size, "norm": norm, "head": head,
                   "schedule": schedule, "limit": limit, "image_size": image_size, "data_root": data_root,
                   "device": device, "probe_every": probe_every}
    try:
        if config is not None:
            try:
                with config.open("rb") as fh:
                    doc: dict[str, Any] = tomllib.load(fh)
            except FileNotFoundError:
                raise SweepConfigError(f"no sweep config at {config}") from None
            except tomllib.TOMLDecodeError as exc:
                raise SweepConfigError(f"{config}: not valid TOML: {exc}") from None
            doc.setdefault("name", config.stem)
        else:
            doc = {"grid": {"data": ["digits"], "model": ["plain34"], "method": PAPER_METHODS.split(","),
                            "optimizer": ["adam"], "lr": [1e-3], "seed": [0]}, "run": {}}
        sweep = SweepConfig.from_mapping(doc)
        # flags override the file: a grid flag replaces that axis, a fixed flag that setting
        over = SweepConfig.from_flags(grid=grid_flags, fixed=fixed_flags)
        for k, v in over.grid.items():
            sweep.fixed.pop(k, None)
            sweep.grid[k] = v
        for k, v in over.fixed.items():
            sweep.grid.pop(k, None)
            sweep.fixed[k] = v
        if db is not None:
            sweep.db = db
        if out is not None:
            sweep.out = out
        if name is not None:
            sweep.name = name
        runs = sweep.expand()
    except (SweepConfigError, ValueError, TypeError) as exc:
        raise _error(str(exc)) from None

    axes = ", ".join(f"{k} ({sum(map(len, v.values())) if isinstance(v, dict) else len(v)})"
                     for k, v in sweep.grid.items())
    console.print(f"sweep {sweep.name or sweep.sweep_id}: {len(runs)} runs over {axes}; db {sweep.db}; out {sweep.out}")
    if dry_run:
        for r in runs:
            d = r.to_dict()
            console.print(f"{r.run_id}  " + " ".join(f"{k}={d[k]}" for k in sweep.grid))
        return
    from initscope.experiments.preflight import PreflightError

    if engine not in ("local", "ray"):
        raise _error(f"--engine: unknown engine {engine!r}; valid: local, ray")
    try:
        if engine == "ray":
            from initscope.experiments.ray_engine import run_sweep_ray

            summary = run_sweep_ray(sweep, address=address, retry_failed=retry_failed, cpus_per_run=cpus_per_run,
                                    gpus_per_run=gpus_per_run)
        else:
            summary = run_sweep(sweep, retry_failed=retry_failed, threads=threads)
    except (PreflightError, ImportError) as exc:
        raise _error(str(exc)) from None
    except KeyboardInterrupt:
        console.print("interrupted: the current run was given back; run the same command again to resume")
        raise typer.Exit(130) from None
    console.print(summary.line())
    if report is not None:
        _write(sweep.db, report, None)
    else:
        console.print(f"report: initscope report {sweep.db} --out report")


def report_cmd(
    db: Path = typer.Argument(..., help="a results database written by `initscope sweep`"),
    out: Path = typer.Option(Path("report"), "--out", help="folder for report.md, report.html, CSVs, figures"),
    title: Optional[str] = typer.Option(None, "--title"),
    where: Optional[list[str]] = typer.Option(None, "--where", help="keep runs with KEY=V1,V2 (repeatable), e.g. optimizer=adam"),
) -> None:
    """Render the papers' tables (Markdown, HTML, CSV) and the training curves from a results database."""
    selected: dict[str, list[str]] = {}
    for item in where or []:
        key, eq, values = item.partition("=")
        if not eq or not key.strip() or not values.strip():
            raise _error(f"--where {item!r}: write it as KEY=VALUE[,VALUE...], e.g. optimizer=adam")
        selected[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    _write(db, out, title, selected)


def _write(db: Path, out: Path, title: Optional[str], where: Optional[dict[str, list[str]]] = None) -> None:
    from initscope.experiments.report import write_report

    try:
        rep = write_report(db, out, title=title, where=where)
    except (FileNotFoundError, ValueError) as exc:
        raise _error(str(exc)) from None
    c = rep.summary["counts"]
    console.print(f"{rep.summary['total']} runs ({c['finished']} finished, {c['diverged']} diverged, "
                  f"{c['failed']} failed, {c['running']} running); wrote {out / 'report.html'}, "
                  f"{out / 'report.md'}, {len(rep.tables)} CSV tables, {len(rep.figures)} figures")
    for t in rep.tables:
        console.print(f"\n{t.title}\n{t.markdown()}")
