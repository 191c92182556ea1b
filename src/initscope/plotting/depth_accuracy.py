"""Test accuracy against depth, one line per method (issue 15: does a residual net train at any depth?)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from initscope.plotting.common import method_colors, new_figure, save_figure


def plot_accuracy_vs_depth(table: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """One panel per epoch of ``table`` (:func:`initscope.experiments.tables.papers.depth_table`): mean test
    accuracy (%) against the number of weight layers, each method a line, its 95 % interval as error bars
    (none for a single seed). Returns the figure; saved as PNG and SVG when ``path`` is given."""
    if table.empty:
        raise ValueError("no accuracies against depth: the runs span fewer than two depths")
    epochs = list(dict.fromkeys(table["epoch"]))
    fig = new_figure(4.2 * len(epochs) + 1.5, 3.8)
    axes = fig.subplots(1, len(epochs), sharey=True, squeeze=False)[0]
    depths = sorted(int(d) for d in table["depth"].unique())
    colors = method_colors(list(dict.fromkeys(table["method"])))
    for ax, epoch in zip(axes, epochs):
        for method, rows in table[table["epoch"] == epoch].groupby("method", sort=False):
            rows = rows.sort_values("depth")
            below = (rows["mean"] - rows["low"]).fillna(0).to_numpy()
            above = (rows["high"] - rows["mean"]).fillna(0).to_numpy()
            ax.errorbar(rows["depth"], rows["mean"], yerr=[below, above], marker="o", capsize=3,
                        color=colors[method], label=str(method))
        # depths double or more from one net to the next: a log axis spaces them evenly
        ax.set_xscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.set_xlabel("weight layers")
        ax.set_title("best-validation checkpoint" if epoch == "best" else f"after epoch {epoch}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)  # a t interval of 3 seeds can reach past 0 or 100; accuracy cannot
    axes[-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
