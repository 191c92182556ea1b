"""``initscope compare``: several initializations probed on one model, on one self-contained HTML page.

:func:`compare` (in :mod:`.run`) probes a fresh copy of the model per method; :mod:`.inputs` makes the
batch it probes with; :mod:`.html` renders the page; :mod:`.cli` is the command.
"""

from initscope.compare.run import CompareResult, compare, parse_methods

__all__ = ["CompareResult", "compare", "parse_methods"]
