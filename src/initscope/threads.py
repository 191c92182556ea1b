"""Torch's intra-op threads while initscope works."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch's ops on one intra-op thread for the duration, then give the user's setting back.

    A propagation is ~2000 small ops, and writing a plan is a serial draw and a scaling per layer:
    neither gains from a second thread. But the OpenMP workers a multi-threaded op wakes spin after
    it, and when another process holds a core they wait for it: beside a busy loop on one of 2 cores,
    ResNet-50's plan took 0.30 s with two threads and 0.08 s with one, and writing a remembered plan
    2.3x the kaiming_normal_ loop instead of 1.4x (on a quiet machine the two settings are within
    noise). ``benchmarks/plan_speed.py`` measures both.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
