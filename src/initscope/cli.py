"""The ``initscope`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from initscope.cli_common import MODEL_ARG_HELP, MODEL_ARGS_HELP, MODEL_HELP, build_model, console, fail, \
    model_kwargs, parse_shape, terminal_width

app = typer.Typer(
    help="Architecture-aware initialization for PyTorch CNNs, with per-layer variance predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("plan")
def plan_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=MODEL_ARG_HELP),
    model_args: Optional[str] = typer.Option(None, "--model-args", help=MODEL_ARGS_HELP),
    method: str = typer.Option("asv-backward", "--method", help="see `initscope methods`"),
    input_shape: str = typer.Option("3,224,224", "--input-shape", help="one sample's shape, no batch dim"),
    distribution: Optional[str] = typer.Option(None, help="normal, uniform or truncated_normal"),
    max_std_ratio: Optional[float] = typer.Option(3.0, help="ASV clamp; 0 disables it"),
    fan: str = typer.Option("true", help="true (group-aware) or framework (torch.nn.init's)"),
    residual: Optional[str] = typer.Option(None, help="residual policy: none, scale or zero"),
    on_unknown: str = typer.Option("error", help="error, skip or kaiming"),
    columns: Optional[str] = typer.Option(None, "--columns", help="the table's columns, comma-separated (default: as many as the terminal fits)"),
    as_json: bool = typer.Option(False, "--json", help="print the whole plan as JSON"),
) -> None:
    """Print the per-layer initialization plan of a model."""
    from initscope.api import plan as make_plan
    from initscope.errors import InitscopeError

    shape = parse_shape(input_shape)
    kwargs = model_kwargs(model_arg, model_args)
    try:
        net = build_model(model, kwargs)
        p = make_plan(net, method, input_shape=shape, distribution=distribution,
                      max_std_ratio=max_std_ratio or None, fan=fan, residual=residual, on_unknown=on_unknown)
        chosen = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
        if chosen is not None:
            p.rows(chosen)  # an unknown column is an error now, listing the valid ones
    except (InitscopeError, ValueError, TypeError) as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=1))
        return
    chosen = chosen or p.fit_columns(terminal_width() - 4, gap=3)  # rich: 3 a column and a rule
    table = Table(title=f"{model} · {p.method} · input {','.join(map(str, shape))}", show_lines=False)
    for i, col in enumerate(chosen):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right", no_wrap=True)
    for row in p.rows(chosen):
        table.add_row(*row)
    console.print(table)
    hidden = [c for c in p.columns() if c not in chosen]
    if hidden and not columns:
        console.print(f"{len(hidden)} column(s) left out to fit the terminal ({', '.join(hidden)}): "
                      "--columns to choose, --json for everything", markup=False)
    for note in p.notes:
        console.print(f"note: {note}", markup=False)


@app.command("audit")
def audit_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + "; built as its own code initializes it"),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=MODEL_ARG_HELP),
    model_args: Optional[str] = typer.Option(None, "--model-args", help=MODEL_ARGS_HELP),
    input_shape: str = typer.Option("3,224,224", "--input-shape", help="one sample's shape, no batch dim"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="load these weights first (.safetensors, or a state dict in .pt/.pth, read with weights_only)"),
    batch: int = typer.Option(16, "--batch", help="Gaussian inputs measured"),
    as_json: bool = typer.Option(False, "--json", help="print the audit as JSON lines, one per layer"),
) -> None:
    """Check the initialization a model holds (no weight changed): per weight layer its std beside every
    known scheme's, predicted and measured second moments, and flags for what looks never applied."""
    from initscope.audit import audit
    from initscope.errors import InitscopeError

    shape = parse_shape(input_shape)
    kwargs = model_kwargs(model_arg, model_args)
    try:
        net = build_model(model, kwargs)
        if checkpoint is not None:
            net.load_state_dict(_read_state(checkpoint))
        report = audit(net, input_shape=shape, batch=batch)
    except (InitscopeError, ValueError, TypeError, OSError, RuntimeError, KeyError) as exc:
        raise fail(exc) from None
    if as_json:
        for layer in report.layers:
            typer.echo(json.dumps(layer.row()))
        return
    table = Table(title=f"audit of {model} · input {','.join(map(str, shape))}")
    for col in ("layer", "std", "nearest scheme", "pred out", "meas out", "pred grad", "meas grad", "flags"):
        table.add_column(col, justify="left" if col in ("layer", "nearest scheme") else "right", no_wrap=col == "layer")
    for l in report.layers:
        near = f"{l.nearest} ×{l.nearest_ratio:.3g}" if l.nearest else "-"
        table.add_row(l.name, f"{l.std:.4g}", near, f"{l.pred_out_var:.3g}", f"{l.meas_out_var:.3g}",
                      f"{l.pred_in_grad_var:.3g}", f"{l.meas_in_grad_var:.3g}", str(len(l.flags)) if l.flags else "")
    console.print(table)
    for l in report.layers:
        for f in l.flags:
            console.print(f"flag {l.name}: {f}")
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if not report.flagged:
        console.print("no layer flagged", markup=False)


def _read_state(path: Path) -> dict:
    """A state dict from a file that cannot run code when read."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


@app.command("methods")
def methods_cmd() -> None:
    """List the initialization methods."""
    from initscope.methods import METHODS

    table = Table("method", "what it sets")
    for m in METHODS.values():
        table.add_row(m.name, m.summary)
    console.print(table)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-output"), "--out", help="folder for the figures and numbers"),
    draws: int = typer.Option(6, help="weight draws per method; the figures show their geometric mean (one draw scatters: docs/theory.md)"),
    batch: int = typer.Option(32, help="inputs per draw"),
    report: bool = typer.Option(True, "--report/--no-report", help="also write the comparison reports (probe figures)"),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="also train the digits sweep and write its report"),
    epochs: int = typer.Option(8, help="epochs per run of the digits sweep"),
) -> None:
    """Plan and measure every method on plain34 and resnet18-nobn; save predicted-vs-measured figures.

    Then, unless switched off: a comparison report per net (initscope compare: box plots, histograms,
    variance against depth, measured against predicted) and a short training sweep on scikit-learn's
    digits with the papers' methods, with its report. Needs no data and no network.
    """
    from initscope.demo import DEMO_MODELS, DEMO_REPORT_METHODS, run_demo, run_demo_sweep
    from initscope.methods import METHODS
    from initscope.progress import step_bar

    with step_bar(len(DEMO_MODELS) * len(METHODS), console=console, description_width=36) as step:
        results = run_demo(out, draws=draws, batch=batch, progress=step)
    for r in results:
        table = Table("method", "pred last out", "meas last out", "worst fwd gap", "worst grad gap",
                      title=f"{r.model}: log2(measured/predicted), worst layer")
        for method, t in r.table.items():
            wf, wg = r.worst(method)
            table.add_row(method, f"{t['pred_out'][-1]:.3g}", f"{t['meas_out'][-1]:.3g}", f"{wf:.2f}", f"{wg:.2f}")
        console.print(table)
        console.print(f"saved {r.figure}")
    if report:
        from initscope.compare.run import compare, compare_steps

        for name in DEMO_MODELS:
            with step_bar(compare_steps(len(DEMO_REPORT_METHODS)), console=console, transient=True,
                          description_width=36) as step:
                result = compare(name, DEMO_REPORT_METHODS, input_shape=(3, 64, 64), batch=16, seed=0,
                                 out_dir=out / f"report_{name}", progress=lambda d, n=name: step(f"{n}: {d}"))
            console.print(f"report: {result.index}")
    if sweep:
        summary, written = run_demo_sweep(out / "sweep", epochs=epochs)
        console.print(summary.line())
        console.print(f"sweep report: {written.out_dir / 'report.html'}")


# Commands that live beside their subsystems. Each module defines plain functions; registering them
# here keeps `initscope --help` in one place. One line per command.
# -- subsystem commands (keep this marker) --
from initscope.experiments.commands import report_cmd, sweep_cmd, train_cmd  # noqa: E402
app.command("train")(train_cmd)
app.command("sweep")(sweep_cmd)
app.command("report")(report_cmd)
from initscope.compare.cli import compare_cmd  # noqa: E402
app.command("compare")(compare_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
