"""``initscope compare``: the comparison report from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def compare_cmd(
    model: str = typer.Option(..., "--model", "-m", help="torchvision name (resnet18), initscope name (plain34, resnet18-nobn) or module:callable"),
    methods: str = typer.Option(..., "--methods", help="comma-separated, e.g. xavier,kaiming-forward,asv-backward (see `initscope methods`)"),
    input_shape: str = typer.Option("3,224,224", "--input-shape", help="one sample's shape, no batch dim"),
    data: Optional[str] = typer.Option(None, "--data", help="digits, synthetic, mnist, fashion-mnist, cifar10, cifar100 or folder:PATH (an ImageFolder tree); default: Gaussian N(0, 1)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="where the torchvision sets lie (default ./data)"),
    batch: int = typer.Option(16, "--batch", help="inputs probed, the same for every method"),
    seed: int = typer.Option(0, "--seed", help="seed of every copy's weights and of the Gaussian batch"),
    out: Path = typer.Option(..., "--out", help="folder for index.html, stats.parquet and the figures"),
) -> None:
    """Probe a fresh copy of the model per method; write a self-contained HTML report with figures and tables."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from initscope.cli import _parse_shape
    from initscope.errors import InitscopeError
    from initscope.report.compare import compare, parse_methods

    console = Console(stderr=True)
    shape = _parse_shape(input_shape)
    try:
        names = parse_methods(methods)  # before anything is built or written
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("building", total=len(names) + 1)
        steps: list[str] = []

        def step(description: str) -> None:
            if steps:
                bar.advance(task)
            steps.append(description)
            bar.update(task, description=description)

        try:
            result = compare(model, names, input_shape=shape, batch=batch, seed=seed, data=data,
                             data_root=data_root, out_dir=out,
                             progress=step)
        except (InitscopeError, ValueError, TypeError) as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(2) from None
        bar.advance(task)
    flagged = result.flagged()
    for method in names:
        n = int((flagged["method"] == method).sum())
        console.print(f"{method}: {n} weight layer(s) more than 2× off the prediction", highlight=False)
    typer.echo(str(result.index))
