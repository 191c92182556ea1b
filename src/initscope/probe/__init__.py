"""The probe: per-layer distributions of weights, outputs, activations and gradients, measured in one
forward and backward pass and set beside an :class:`~initscope.InitPlan`'s predictions.

``summary`` holds the statistics of one tensor, ``hooks`` the hook machinery, ``probe`` the pass and
its table, ``callback`` the same measurement every N steps of training.
"""

from initscope.probe.callback import ProbeCallback
from initscope.probe.hooks import QUANTITIES
from initscope.probe.probe import COLUMNS, LayerStats, Probe, ProbeError, load_frame, probe, save_frame
from initscope.probe.summary import QUANTILES, Stats, rank_error, summarize

__all__ = ["COLUMNS", "QUANTILES", "QUANTITIES", "LayerStats", "Probe", "ProbeCallback", "ProbeError", "Stats",
           "load_frame", "probe", "rank_error", "save_frame", "summarize"]
