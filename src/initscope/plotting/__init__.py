"""Figures (matplotlib, Agg backend: no screen needed)."""

from initscope.plotting.depth import plot_variance_vs_depth

__all__ = ["plot_variance_vs_depth"]
