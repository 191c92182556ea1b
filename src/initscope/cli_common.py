"""What every ``initscope`` command shares: the consoles, the error exit, the input-shape argument.

The commands live beside their subsystems (``initscope.experiments.commands``, ``initscope.compare.cli``)
and :mod:`initscope.cli` registers them; they import from here, never from the CLI that registers them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text

# markup=False: what these consoles print is mostly not ours (paths, sweep names, model names, messages
# quoting a TOML key such as [grid]), and rich would read its brackets as tags: drop them, or raise a
# MarkupError on a path holding [/x]. Styles are given as Text where we want them.
console = Console(highlight=False, markup=False)
if not console.is_terminal:  # piped or captured: don't squeeze the tables to 80 columns, keep lines whole
    console.width = 200
err_console = Console(stderr=True, highlight=False, markup=False)


def error_text(message: object) -> Text:
    """``error: message`` with the prefix in red and the message taken literally."""
    return Text.assemble(("error:", "red"), " ", str(message))


def fail(message: object, code: int = 2, *, to: Console | None = None) -> typer.Exit:
    """Print ``error: message`` (taken literally, never as markup) and return the exit to raise."""
    (to or console).print(error_text(message))
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


class LiveCommand:
    """A command whose parameters are built when typer reads them, not when the module is imported.

    typer turns a callback's ``inspect.signature`` into flags each time it builds the command; a
    ``__signature__`` property is read then, so flags and help that list a registry (data sources,
    engines, methods) include what was registered after this module was imported.

    Args:
        fn: the command's body; it takes the flags as keyword arguments (``**flags``).
        params: returns the ``inspect.Parameter`` list (each with a ``typer.Option`` default).
    """

    def __init__(self, fn: Callable[..., None], params: Callable[[], list[inspect.Parameter]]) -> None:
        self.__name__, self.__qualname__, self.__module__ = fn.__name__, fn.__qualname__, fn.__module__
        self.__doc__ = fn.__doc__  # typer's help text
        self.__annotations__: dict[str, Any] = {}  # typer asks typing.get_type_hints; the types are in the signature
        self._fn, self._params = fn, params

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self._params())

    def __call__(self, **flags: Any) -> None:
        return self._fn(**flags)
