"""``initscope compare``: the comparison report from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from initscope.compare.inputs import GAUSSIAN, sources
from initscope.cli_common import MODEL_ARG_HELP, MODEL_ARGS_HELP, MODEL_HELP, build_model, err_console, fail, \
    model_kwargs, parse_shape


def compare_cmd(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help=MODEL_ARG_HELP),
    model_args: Optional[str] = typer.Option(None, "--model-args", help=MODEL_ARGS_HELP),
    methods: str = typer.Option(..., "--methods", help="comma-separated, e.g. xavier,kaiming-forward,asv-backward (see `initscope methods`)"),
    input_shape: str = typer.Option("3,224,224", "--input-shape", help="one sample's shape, no batch dim"),
    # escaped: the sources are a registry's, and typer reads help as rich markup
    data: Optional[str] = typer.Option(None, "--data", help=escape(
        f"where the inputs come from: {', '.join(sources())} (default: {GAUSSIAN}, i.i.d. N(0, 1))")),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="where the torchvision sets and relative folder: paths lie (default ./data)"),
    batch: int = typer.Option(16, "--batch", help="inputs probed, the same for every method"),
    draws: int = typer.Option(1, "--draws", min=1, help="weight draws per method, measured second moments averaged (geometric mean): the band a measurement may stay in shrinks by sqrt(draws)"),
    seed: int = typer.Option(0, "--seed", help="seed of every copy's weights and of the Gaussian batch"),
    out: Path = typer.Option(..., "--out", help="folder for index.html, stats.parquet and the figures"),
) -> None:
    """Probe a fresh copy of the model per method; write a self-contained HTML report with figures and tables."""
    from initscope.compare.run import compare, compare_steps, parse_methods
    from initscope.errors import InitscopeError
    from initscope.progress import step_bar

    shape = parse_shape(input_shape)
    kwargs = model_kwargs(model_arg, model_args)

    def factory():
        return build_model(model, kwargs)

    factory.__qualname__ = model + (f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else "")
    try:
        names = parse_methods(methods)  # before anything is built or written
    except ValueError as exc:
        raise fail(exc, to=err_console) from None
    try:
        with step_bar(compare_steps(len(names), draws), console=err_console, transient=True) as step:
            result = compare(factory, names, input_shape=shape, batch=batch, seed=seed, data=data, draws=draws,
                             data_root=data_root, out_dir=out, progress=step)
    except (InitscopeError, ValueError, TypeError) as exc:
        raise fail(exc, to=err_console) from None
    flagged = result.flagged()
    for method in names:
        n = int((flagged["method"] == method).sum())
        err_console.print(f"{method}: {n} weight layer(s) flagged, outside the plan's predicted spread")
    typer.echo(str(result.index))
