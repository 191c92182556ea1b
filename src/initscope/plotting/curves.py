"""Training and validation curves, accuracy and loss per epoch (Figs. 4 and 5 of the Glorot/He paper)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from initscope.plotting.common import check_columns, method_colors, new_figure, save_figure

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
# Validation and training differ in line style and in marker, so that a run of one or two epochs (points, not
# lines) still says which is which.
SPLITS = (("val", "validation", "-", "o"), ("train", "training", "--", "s"))
MARKERS_BELOW = 15  # epochs: fewer, and every epoch is a marker too
LOG_LOSS_ABOVE = 100.0  # the loss panel goes logarithmic when its largest value passes this times its smallest


def accuracy_percent(values: "Sequence[float] | pd.Series") -> pd.Series:
    """Accuracies (fractions, as the runs record them) in percent, the report's one convention; non-finite
    values (a diverged run) become gaps."""
    y = pd.to_numeric(pd.Series(values), errors="coerce").astype(float) * 100.0
    return y.where(y.abs() != float("inf"))


def loss_scale(frame: pd.DataFrame) -> str:
    """``"log"`` when the losses span more than :data:`LOG_LOSS_ABOVE` times (a run that starts with
    saturated logits, whose first loss hides every other curve on a linear axis), else ``"linear"``;
    linear whenever a loss is not positive."""
    values = pd.concat([pd.to_numeric(frame[f"{split}_loss"], errors="coerce") for split, *_ in SPLITS])
    values = values[values.abs() != float("inf")].dropna()
    if values.empty or (values <= 0).any():
        return "linear"
    return "log" if values.max() > LOG_LOSS_ABOVE * values.min() else "linear"


def history_frame(history, who: str) -> tuple[pd.DataFrame, list[str], dict[str, tuple]]:
    """A run's history (a frame or rows) checked for :data:`HISTORY_COLUMNS` (``who`` names the caller in
    the error), with a text ``label`` column (empty where none), its labels in order and their colours."""
    frame = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    check_columns(frame, HISTORY_COLUMNS, who)
    if "label" not in frame.columns:
        frame = frame.assign(label="")
    frame = frame.assign(label=frame["label"].astype(str))
    labels = list(dict.fromkeys(frame["label"]))
    return frame, labels, method_colors(labels)


def plot_training_curves(history, *, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Accuracy in % (left) and loss (right) against epoch: validation solid with dots, training dashed with
    squares.

    Args:
        history: a table with the columns ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy`` (a DataFrame, or a list of dicts such as ``RunResult.history``; accuracies as
            fractions, drawn in percent, as the report's tables give them), and optionally ``label``: one
            colour per label (a run, a method).
        path: if given, the figure is also saved there as PNG and SVG.
        title: the figure's title.

    Lines carry the gids ``<accuracy|loss>|<train|val>|<label>``. A diverged run's non-finite values
    are left as gaps. The loss axis is logarithmic when the losses span more than 100 times
    (:func:`loss_scale`). Epochs are whole numbers on the axis; a run shorter than 15 epochs has a marker at
    every epoch, its split told by the marker as well as by the line (the legend shows both).
    """
    frame, labels, colors = history_frame(history, "plot_training_curves")

    fig = new_figure(11.0, 4.2)
    fig.subplots_adjust(left=0.07, right=0.83, bottom=0.13, top=0.85, wspace=0.22)  # fixed: no tight_layout pass
    acc_ax, loss_ax = fig.subplots(1, 2, sharex=True)
    longest = 0
    for label in labels:
        run = frame[frame["label"] == label].sort_values("epoch", kind="stable")
        longest = max(longest, len(run))
        for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            for split, _name, style, marker in SPLITS:
                values = run[f"{split}_{metric}"]
                if metric == "accuracy":
                    y = accuracy_percent(values.to_numpy())
                else:
                    y = pd.to_numeric(values, errors="coerce").astype(float)
                    y = y.where(y.abs() != float("inf"))
                ax.plot(run["epoch"].to_numpy(), y.to_numpy(), style, color=colors[label], lw=1.5,
                        marker=marker if len(run) < MARKERS_BELOW else None, ms=4,
                        mfc="white" if split == "train" else colors[label], gid=f"{metric}|{split}|{label}")
    acc_ax.set_title("accuracy (%)", fontsize=10)
    scale = loss_scale(frame)
    loss_ax.set_yscale(scale)
    loss_ax.set_title("loss" if scale == "linear" else "loss (log scale)", fontsize=10)
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if longest == 1:  # a single epoch: the points in the middle, a tick at their epoch and none elsewhere
        epochs = sorted(set(pd.to_numeric(frame["epoch"], errors="coerce").dropna().astype(int)))
        if epochs:
            acc_ax.set_xlim(epochs[0] - 1, epochs[-1] + 1)  # sharex: the loss panel's too
            acc_ax.set_xticks(epochs)
    handles = [Line2D([], [], color=colors[lb], lw=2) for lb in labels if lb]
    names = [lb for lb in labels if lb]
    few = longest < MARKERS_BELOW
    handles += [Line2D([], [], color="k", ls=style, marker=marker if few else None, ms=4,
                       mfc="white" if split == "train" else "k") for split, _n, style, marker in SPLITS]
    names += [name for _s, name, _st, _m in SPLITS]
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "training (dashed) and validation (solid)", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig
