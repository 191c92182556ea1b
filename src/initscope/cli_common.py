"""What every ``initscope`` command shares: the consoles, the error exit, the input-shape argument.

The commands live beside their subsystems (``initscope.experiments.commands``, ``initscope.compare.cli``)
and :mod:`initscope.cli` registers them; they import from here, never from the CLI that registers them.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text

# markup=False: what these consoles print is mostly not ours (paths, sweep names, model names, messages
# quoting a TOML key such as [grid]), and rich would read its brackets as tags: drop them, or raise a
# MarkupError on a path holding [/x]. Styles are given as Text where we want them.
console = Console(highlight=False, markup=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    # piped or captured, with no width asked for: don't squeeze the tables to 80 columns, keep lines whole
    console.width = 200
err_console = Console(stderr=True, highlight=False, markup=False)


def error_text(message: object) -> Text:
    """``error: message`` with the prefix in red and the message taken literally."""
    return Text.assemble(("error:", "red"), " ", str(message))


def terminal_width() -> int:
    """The width to fit tables to: ``$COLUMNS`` when set (read now, not at import), else the console's."""
    try:
        return max(40, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        return console.width


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


MODEL_HELP = ("initscope name (plain34, resnet18-nobn; `initscope.models.list_models()`), torchvision name "
              "(resnet50), timm:NAME, or package.module:callable")
MODEL_ARG_HELP = "an argument of the model's constructor, KEY=VALUE (repeatable; VALUE read as JSON if it is), e.g. width=16"
MODEL_ARGS_HELP = "the model's constructor arguments as a JSON object, e.g. '{\"width\": 16, \"in_channels\": 1}'"


def model_kwargs(args: list[str] | None, args_json: str | None) -> dict[str, Any]:
    """The constructor arguments given by ``--model-arg KEY=VALUE`` (repeatable) and ``--model-args JSON``."""
    import json

    kwargs: dict[str, Any] = {}
    if args_json:
        try:
            parsed = json.loads(args_json)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--model-args {args_json!r} is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise typer.BadParameter(f"--model-args must be a JSON object, like '{{\"width\": 16}}', not {args_json!r}")
        kwargs.update(parsed)
    for item in args or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise typer.BadParameter(f"--model-arg {item!r}: write it as KEY=VALUE, e.g. width=16")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value  # a plain string: norm=none
    return kwargs


def build_model(name: str, kwargs: dict[str, Any]):
    """``create_model(name, **kwargs)``; a constructor that refuses an argument is a ``ValueError``."""
    from initscope.models import create_model

    try:
        return create_model(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} with arguments {kwargs}: {exc}") from None


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
