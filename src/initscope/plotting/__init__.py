"""Figures (matplotlib, Agg backend: no screen needed).

Each takes the probe's table (``Probe.to_frame()``, or several concatenated with a ``method``
column) or a run's history, returns a :class:`matplotlib.figure.Figure`, and with ``path=`` also
saves it as PNG and SVG.
"""

from initscope.plotting.boxes import plot_boxes
from initscope.plotting.common import save_figure
from initscope.plotting.curves import plot_training_curves
from initscope.plotting.depth import plot_depth, plot_variance_vs_depth
from initscope.plotting.histograms import plot_histograms

__all__ = [
    "plot_boxes",
    "plot_depth",
    "plot_histograms",
    "plot_training_curves",
    "plot_variance_vs_depth",
    "save_figure",
]
