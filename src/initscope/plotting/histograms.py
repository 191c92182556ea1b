"""Per-layer histograms, methods in rows and layers in columns (Figs. 6 and 7 of the Glorot/He paper),
drawn from the probe's fixed-bin counts: ``hist_counts`` over equal bins from ``hist_lo`` to ``hist_hi``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from initscope.plotting.common import (
    LABELS,
    MIN_FONT,
    check_columns,
    check_quantity,
    evenly,
    layers_in_order,
    method_colors,
    methods_of,
    new_figure,
    save_figure,
    short_name,
    with_method,
)


_PLAIN = FuncFormatter(lambda v, _pos: f"{v:g}")


def hist_counts(value) -> np.ndarray:
    """The counts of one row as an int array; a CSV-loaded table stores them as a JSON string."""
    if isinstance(value, str):
        value = json.loads(value)
    if value is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(value, dtype=np.int64).reshape(-1)


def plot_histograms(
    frame,
    quantity: str = "activation",
    *,
    max_layers: int = 8,
    log: bool = True,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """A grid of histograms of ``quantity``: one row per method, one column per layer.

    Args:
        frame: the probe's table, or several concatenated with a ``method`` column.
        quantity: which tensor: ``activation`` (Fig. 6), ``output_grad`` or ``weight_grad`` (Fig. 7), ...
        max_layers: at most this many columns; deeper nets show layers evenly spaced from the first to
            the last (the title says so).
        log: counts on a log scale (a ReLU's exact zeros would flatten everything else on a linear one).
            Each row shares one count axis.
        path: if given, the figure is also saved there as PNG and SVG.
        title: the figure's title.

    Each histogram is one step patch with the gid ``hist|<method>|<layer>``; its values are the counts.
    No text is smaller than 7 pt (:data:`~initscope.plotting.common.MIN_FONT`); a layer's name over its
    column is cut in the middle past 22 characters.
    """
    check_quantity(quantity)
    check_columns(frame, ["layer", "index", "quantity", "hist_lo", "hist_hi", "hist_counts"], "plot_histograms")
    frame = with_method(frame)
    methods = methods_of(frame)
    sub = frame[frame["quantity"] == quantity]
    rows = {(r["method"], r["layer"]): r for r in sub.to_dict("records") if len(hist_counts(r["hist_counts"]))}
    have = {layer for _, layer in rows}
    layers = [name for name in layers_in_order(frame) if name in have]
    if not layers:
        raise ValueError(f"no layer has a histogram of {quantity!r} (probed with histograms=False, or no such rows)")
    shown = evenly(layers, max_layers)
    colors = method_colors(methods)

    width, height = 1.9 * len(shown) + 1.1, 1.6 * len(methods) + 1.0
    fig = new_figure(width, height)
    # Fixed margins in inches: tight_layout measures every tick label of every panel, seconds on a big grid.
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.4 / height, top=1 - 0.75 / height,
                        wspace=0.4, hspace=0.45)
    # One count axis per row (a method), labelled on the first panel only: tick labels are most of the
    # drawing time of a grid this size.
    axes = fig.subplots(len(methods), len(shown), squeeze=False, sharey="row")
    for mi, method in enumerate(methods):
        top = 0
        for li, layer in enumerate(shown):
            ax = axes[mi, li]
            row = rows.get((method, layer))
            if row is None:
                ax.set_axis_off()
                continue
            counts = hist_counts(row["hist_counts"])
            edges = np.linspace(float(row["hist_lo"]), float(row["hist_hi"]), len(counts) + 1)
            patch = ax.stairs(counts, edges, fill=True, color=colors[method], alpha=0.8)
            patch.set_gid(f"hist|{method}|{layer}")
            top = max(top, int(counts.max()))
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.tick_params(labelsize=MIN_FONT)
            ax.xaxis.get_offset_text().set_fontsize(MIN_FONT)
            if mi == 0:
                ax.set_title(short_name(layer, 22), fontsize=8)
        first = axes[mi, 0]
        first.yaxis.get_offset_text().set_fontsize(MIN_FONT)
        if method:
            first.set_ylabel(method, fontsize=9)
        if top > 0:
            if log:
                first.set_yscale("log")
                first.set_ylim(0.7, top * 1.5)
                first.yaxis.set_major_locator(LogLocator(numticks=4))
                first.yaxis.set_major_formatter(_PLAIN)  # mathtext 10^k labels cost more than the bars
            else:
                first.set_ylim(0, top * 1.05)
                first.yaxis.set_major_locator(MaxNLocator(3))
        first.yaxis.set_minor_locator(NullLocator())
    what = LABELS[quantity]
    head = title or f"histograms of {what}"
    if len(shown) < len(layers):
        head += f" — {len(shown)} of {len(layers)} layers, evenly spaced"
    fig.suptitle(head + (" (counts, log scale)" if log else " (counts)"), fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig
