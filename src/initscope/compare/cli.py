"""``initscope compare``: the comparison report from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from initscope.compare.inputs import GAUSSIAN, sources
from initscope.cli_common import err_console, fail, parse_shape


def compare_cmd(
    model: str = typer.Option(..., "--model", "-m", help="torchvision name (resnet18), initscope name (plain34, resnet18-nobn) or module:callable"),
    methods: str = typer.Option(..., "--methods", help="comma-separated, e.g. xavier,kaiming-forward,asv-backward (see `initscope methods`)"),
    input_shape: str = typer.Option("3,224,224", "--input-shape", help="one sample's shape, no batch dim"),
    # escaped: the sources are a registry's, and typer reads help as rich markup
    data: Optional[str] = typer.Option(None, "--data", help=escape(
        f"where the inputs come from: {', '.join(sources())} (default: {GAUSSIAN}, i.i.d. N(0, 1))")),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="where the torchvision sets and relative folder: paths lie (default ./data)"),
    batch: int = typer.Option(16, "--batch", help="inputs probed, the same for every method"),
    seed: int = typer.Option(0, "--seed", help="seed of every copy's weights and of the Gaussian batch"),
    out: Path = typer.Option(..., "--out", help="folder for index.html, stats.parquet and the figures"),
) -> None:
    """Probe a fresh copy of the model per method; write a self-contained HTML report with figures and tables."""
    from initscope.compare.run import compare, parse_methods
    from initscope.errors import InitscopeError
    from initscope.progress import step_bar

    shape = parse_shape(input_shape)
    try:
        names = parse_methods(methods)  # before anything is built or written
    except ValueError as exc:
        raise fail(exc, to=err_console) from None
    try:
        with step_bar(len(names) + 1, console=err_console, transient=True) as step:
            result = compare(model, names, input_shape=shape, batch=batch, seed=seed, data=data,
                             data_root=data_root, out_dir=out, progress=step)
    except (InitscopeError, ValueError, TypeError) as exc:
        raise fail(exc, to=err_console) from None
    flagged = result.flagged()
    for method in names:
        n = int((flagged["method"] == method).sum())
        err_console.print(f"{method}: {n} weight layer(s) more than 2× off the prediction")
    typer.echo(str(result.index))
