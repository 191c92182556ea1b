"""Training and validation curves, accuracy and loss per epoch (Figs. 4 and 5 of the Glorot/He paper)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from initscope.plotting.common import check_columns, method_colors, new_figure, save_figure

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def plot_training_curves(history, *, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Accuracy (left) and loss (right) against epoch: validation solid, training dashed.

    Args:
        history: a table with the columns ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy`` (a DataFrame, or a list of dicts such as ``RunResult.history``), and
            optionally ``label``: one colour per label (a run, a method).
        path: if given, the figure is also saved there as PNG and SVG.
        title: the figure's title.

    Lines carry the gids ``<accuracy|loss>|<train|val>|<label>``. A diverged run's non-finite values
    are left as gaps.
    """
    frame = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    check_columns(frame, HISTORY_COLUMNS, "plot_training_curves")
    if "label" not in frame.columns:
        frame = frame.assign(label="")
    frame = frame.assign(label=frame["label"].astype(str))
    labels = list(dict.fromkeys(frame["label"]))
    colors = method_colors(labels)

    fig = new_figure(11.0, 4.2)
    fig.subplots_adjust(left=0.07, right=0.83, bottom=0.13, top=0.85, wspace=0.22)  # fixed: no tight_layout pass
    acc_ax, loss_ax = fig.subplots(1, 2, sharex=True)
    for label in labels:
        run = frame[frame["label"] == label].sort_values("epoch", kind="stable")
        for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            for split, style in (("val", "-"), ("train", "--")):
                y = pd.to_numeric(run[f"{split}_{metric}"], errors="coerce").astype(float)
                y = y.where(y.abs() != float("inf"))
                ax.plot(run["epoch"].to_numpy(), y.to_numpy(), style, color=colors[label], lw=1.5,
                        marker="o" if len(run) < 15 else None, ms=3, gid=f"{metric}|{split}|{label}")
    acc_ax.set_title("accuracy", fontsize=10)
    loss_ax.set_title("loss", fontsize=10)
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[lb], lw=2) for lb in labels if lb]
    names = [lb for lb in labels if lb]
    handles += [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")]
    names += ["validation", "training"]
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "training (dashed) and validation (solid)", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig
