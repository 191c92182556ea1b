"""What every ``initscope`` command shares: the consoles, the error exit, the input-shape argument.

The commands live beside their subsystems (``initscope.experiments.commands``, ``initscope.compare.cli``)
and :mod:`initscope.cli` registers them; they import from here, never from the CLI that registers them.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
if not console.is_terminal:  # piped or captured: don't squeeze the tables to 80 columns, keep lines whole
    console.width = 200
err_console = Console(stderr=True, highlight=False)


def fail(message: object, code: int = 2, *, to: Console | None = None) -> typer.Exit:
    """Print ``error: message`` (taken literally, never as markup) and return the exit to raise."""
    (to or console).print(f"[red]error:[/red] {escape(str(message))}")
    return typer.Exit(code)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``; anything else is a ``BadParameter``."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape: write it like 3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise typer.BadParameter(f"{text!r} is not a shape: write it like 3,224,224")
    return shape
