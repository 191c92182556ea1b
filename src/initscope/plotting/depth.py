"""Per-layer second moments against depth: predicted (dashed) beside measured (solid)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _log2(values: Sequence[float]) -> list[float]:
    return [math.log2(v) if v > 0 else math.nan for v in values]


def plot_variance_vs_depth(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Save a two-panel figure: forward ``E[u²]`` and input-gradient ``E[g²]`` per weight layer.

    ``results[method]`` holds the lists ``pred_out``, ``meas_out``, ``pred_grad``, ``meas_grad``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    cmap = plt.get_cmap("tab10")
    for i, (method, r) in enumerate(results.items()):
        color = cmap(i % 10)
        depth = range(len(r["pred_out"]))
        axes[0].plot(depth, _log2(r["meas_out"]), "-", color=color, label=method, lw=1.6)
        axes[0].plot(depth, _log2(r["pred_out"]), "--", color=color, lw=1.2)
        axes[1].plot(depth, _log2(r["meas_grad"]), "-", color=color, lw=1.6)
        axes[1].plot(depth, _log2(r["pred_grad"]), "--", color=color, lw=1.2)
    axes[0].set_title("forward: log2 E[u²] of each weight layer's output")
    axes[1].set_title("backward: log2 E[(∂L/∂x)²] at each weight layer's input")
    for ax in axes:
        ax.set_xlabel("weight layer (order of the forward pass)")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log2 second moment")
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="k", ls="-"), plt.Line2D([], [], color="k", ls="--")]
    labels += ["measured", "predicted"]
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
