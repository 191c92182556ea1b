"""``initscope compare``: several initializations probed on one model, on one self-contained HTML page.

:func:`compare` (in :mod:`.run`) probes a fresh copy of the model per method; :mod:`.inputs` makes the
batch it probes with; :mod:`.html` renders the page; :mod:`.cli` is the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from initscope.compare.run import CompareResult, compare, parse_methods

__all__ = ["CompareResult", "compare", "parse_methods"]


def __getattr__(name: str):
    # Loaded on first use: .run imports pandas and matplotlib, which the CLI's start (`initscope
    # methods`, `--help`) would otherwise pay for through .cli's import of .inputs.
    if name in __all__:
        from initscope.compare import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
