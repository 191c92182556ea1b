"""Progress bars: every bar initscope shows is made here, on rich, with the same columns.

:func:`progress_bar` is one ``rich.progress.Progress``: a description, the bar, ``done/total``, any
text fields the caller names (a training bar's loss and images per second, each written by the
caller with its unit), the elapsed time. A bar
that is not ``enabled`` is created disabled, so callers never branch on whether to show one.
:func:`step_bar` is the shape the demo and ``initscope compare`` need: a bar over a known number of
steps, advanced each time the work announces the next step by its description.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(*fields: str, enabled: bool = True, transient: bool = False, console: Any = None,
                 description_width: int | None = None) -> Progress:
    """A rich ``Progress`` with initscope's columns; use it as a context manager.

    Args:
        fields: names of text fields shown after the counter; give each task their text with
            ``add_task(..., name=text)`` and ``update(..., name=text)`` (``loss="loss 2.30"``).
        enabled: False makes a bar that draws nothing (its methods still work).
        transient: erase the bar when it ends.
        console: the rich console to draw on (rich's default when None).
        description_width: pad descriptions to this many characters, so the bars line up.

    Examples:
        >>> with progress_bar("loss") as bar:
        ...     task = bar.add_task("epoch 1/5", total=100, loss="")
        ...     bar.update(task, advance=1, loss="loss 2.30")
    """
    description = "{task.description}" if description_width is None else f"{{task.description:<{description_width}}}"
    # markup=False: descriptions carry run labels and paths (folder:/data/[x]), which rich would read as tags
    columns: list[Any] = [TextColumn(description, markup=False), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}", markup=False) for name in fields]
    columns.append(TimeElapsedColumn())
    return Progress(*columns, disable=not enabled, transient=transient, console=console)


@contextmanager
def step_bar(total: int, *, console: Any = None, transient: bool = False,
             description_width: int = 28) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` steps; yields ``step(description)``, to be called as each step starts.

    Each call finishes the step before it; leaving the block finishes the last one. This fits work that
    reports progress through a ``progress=`` callback (``run_demo``, ``compare``).
    """
    with progress_bar(console=console, transient=transient, description_width=description_width) as bar:
        task = bar.add_task("starting", total=total)
        started = False

        def step(description: str) -> None:
            nonlocal started
            if started:
                bar.advance(task)
            started = True
            bar.update(task, description=description)

        yield step
        if started:
            bar.advance(task)
