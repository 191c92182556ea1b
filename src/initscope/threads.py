"""Torch's intra-op threads: every place initscope changes them goes through here.

Two needs, one rule (give the user's setting back):

* :func:`one_intra_op_thread`: planning and writing a plan run torch on one thread for their duration.
* :func:`torch_threads`: a sweep, a training run or a Ray worker that was told how many threads to use.

Why one thread so often: a propagation is ~2000 small ops and writing a plan is a serial draw and a
scaling per layer; neither gains from a second thread, while the OpenMP workers a multi-threaded op
wakes spin after it and, when another process holds a core, wait for it. The measurements are in
``docs/theory.md`` (planning speed) and ``benchmarks/plan_speed.py`` prints them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class ThreadHold:
    """Torch's intra-op threads set to ``n`` from now until :meth:`release` (idempotent).

    For a setting that must outlive one ``with`` block: :class:`initscope.draws.Prefetch` keeps the
    caller on one thread while its drawing thread runs, and gives the threads back when it is joined.
    """

    def __init__(self, n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        self._before: int | None = torch.get_num_threads()
        if self._before != n:
            torch.set_num_threads(n)
        else:
            self._before = None

    def release(self) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
        self._before = None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch's ops on ``n`` intra-op threads for the duration (None: leave torch's setting)."""
    if n is None:
        yield
        return
    hold = ThreadHold(n)
    try:
        yield
    finally:
        hold.release()


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch's ops on one intra-op thread for the duration, then give the user's setting back.

    Only ever lowers the count: on a machine where torch already runs one thread nothing changes.
    """
    if torch.get_num_threads() <= 1:
        yield
        return
    with torch_threads(1):
        yield
