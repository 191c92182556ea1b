"""Per-layer second moments against depth: predicted (dashed) beside measured (solid).

``plot_variance_vs_depth`` draws log2 values from the demo's measurement dicts; ``plot_depth`` draws
the probe's table on a log axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


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


_WEIGHT_KINDS = ("conv1d", "conv2d", "conv3d", "convtranspose1d", "convtranspose2d", "convtranspose3d", "linear")


def depth_series(frame, method: str) -> dict[str, list]:
    """One method's weight layers in forward order, with measured and predicted second moments.

    Measured: ``second_moment`` of each layer's ``output`` row (forward) and of its ``input_grad`` row
    (backward); predicted: the plan's ``pred_out_var`` and ``pred_in_grad_var`` (NaN without a plan).
    """
    from initscope.plotting.common import layers_in_order

    sub = frame[(frame["method"] == method) & frame["kind"].isin(_WEIGHT_KINDS)]
    by = {(r["layer"], r["quantity"]): r for r in sub.to_dict("records")}
    layers = [name for name in layers_in_order(sub) if (name, "output") in by]
    nan = float("nan")

    def col(name: str, quantity: str, column: str) -> float:
        row = by.get((name, quantity))
        return float(row[column]) if row is not None and column in row and row[column] is not None else nan

    return {
        "layers": layers,
        "meas_out": [col(n, "output", "second_moment") for n in layers],
        "pred_out": [col(n, "output", "pred_out_var") for n in layers],
        "meas_grad": [col(n, "input_grad", "second_moment") for n in layers],
        "pred_grad": [col(n, "output", "pred_in_grad_var") for n in layers],
        # How far a measurement may lie from the prediction before it is flagged (bits; the plan's
        # draw-to-draw spread, see initscope.probe.flag_limit); NaN in frames without it.
        "band_out": [col(n, "output", "flag_out_bits") for n in layers],
        "band_grad": [col(n, "output", "flag_grad_bits") for n in layers],
        # E[g²] measured at the last weight layer's output: the network's output when it ends in its head
        "head_grad": col(layers[-1], "output_grad", "second_moment") if layers else nan,
    }


OUTPUT_GRAD = ("unit", "measured")


def scaled_predictions(series: dict[str, list], output_grad: str) -> tuple[list[float], float]:
    """The backward predictions as drawn, and the factor they were multiplied by.

    The plans predict ``E[(∂L/∂x)²]`` for a unit gradient at the network's output (``E[g²] = 1``, as
    ``compare``'s loss Σ output · ξ makes it). A training loss is another matter: cross-entropy's gradient
    at the logits is ``(softmax - onehot) / batch``, 3-5 decades below 1. The backward pass is linear in
    that gradient, so ``output_grad="measured"`` multiplies every prediction by ``E[g²]`` measured at the
    output (the last weight layer's ``output_grad``): what the plan predicts for the gradient this loss
    sent back. ``"unit"`` leaves them as planned.
    """
    if output_grad not in OUTPUT_GRAD:
        raise ValueError(f"output_grad={output_grad!r} is not one of {OUTPUT_GRAD}")
    if output_grad == "unit":
        return list(series["pred_grad"]), 1.0
    g = series["head_grad"]
    if not (g == g and g > 0):
        return [math.nan] * len(series["pred_grad"]), math.nan
    return [p * g for p in series["pred_grad"]], g


def depth_frame(frame: "pd.DataFrame", output_grad: str, who: str) -> tuple["pd.DataFrame", list[str], dict]:
    """The probe table checked for what a depth figure reads (``who`` names the caller in the error), with a
    ``method`` column, its methods in order and their colours."""
    from initscope.plotting.common import check_columns, method_colors, methods_of, with_method

    if output_grad not in OUTPUT_GRAD:
        raise ValueError(f"output_grad={output_grad!r} is not one of {OUTPUT_GRAD}")
    check_columns(frame, ["layer", "index", "kind", "quantity", "second_moment", "pred_out_var", "pred_in_grad_var"],
                  who)
    frame = with_method(frame)
    methods = methods_of(frame)
    return frame, methods, method_colors(methods)


def plot_depth(frame: "pd.DataFrame", *, path: str | Path | None = None, title: str | None = None,
               output_grad: str = "unit") -> "Figure":
    """Variance against depth from the probe's table: measured solid, predicted dashed, log scale.

    Left panel (forward): ``E[u²]`` of each weight layer's output, measured, beside ``pred_out_var``.
    Right panel (backward): ``E[(∂L/∂x)²]`` at each weight layer's input, measured, beside
    ``pred_in_grad_var`` (``output_grad="unit"``: as planned, for a unit gradient at the output, what
    ``compare``'s loss gives) or beside ``pred_in_grad_var`` times ``E[g²]`` measured at the output
    (``output_grad="measured"``: for a probe taken with a training loss such as cross-entropy, whose output
    gradient is decades below 1; see :func:`scaled_predictions`); the panel's title and the legend say
    which. One colour per method. Lines carry the gids ``<measured|predicted>-<forward|backward>|<method>``.
    Non-positive values are left out (a log axis has no place for them).
    """
    from initscope.plotting.common import new_figure, save_figure

    frame, methods, colors = depth_frame(frame, output_grad, "plot_depth")
    fig = new_figure(12.0, 4.6)
    # Fixed margins: tight_layout measures every tick label, the slowest part of drawing this figure.
    fig.subplots_adjust(left=0.07, right=0.85, bottom=0.12, top=0.84, wspace=0.2)
    fwd, bwd = fig.subplots(1, 2, sharex=True)
    drew_prediction = False
    for method in methods:
        s = depth_series(frame, method)
        x = list(range(len(s["layers"])))
        c = colors[method]
        pred_grad, _factor = scaled_predictions(s, output_grad)
        for ax, meas, pred, band, side in ((fwd, s["meas_out"], s["pred_out"], s["band_out"], "forward"),
                                           (bwd, s["meas_grad"], pred_grad, s["band_grad"], "backward")):
            ax.plot(x, _positive(meas), "-", color=c, lw=1.6, label=method or "measured",
                    gid=f"measured-{side}|{method}")
            if any(v == v for v in pred):
                ax.plot(x, _positive(pred), "--", color=c, lw=1.2, gid=f"predicted-{side}|{method}")
                lo = [p * 2.0 ** -b if p > 0 and b == b else math.nan for p, b in zip(pred, band)]
                hi = [p * 2.0 ** b if p > 0 and b == b else math.nan for p, b in zip(pred, band)]
                if any(v == v for v in lo):
                    # What the plan allows a measurement: outside the band a layer is flagged.
                    ax.fill_between(x, lo, hi, color=c, alpha=0.12, lw=0, gid=f"band-{side}|{method}")
                drew_prediction = True
    fwd.set_title("forward: E[u²] at each weight layer's output", fontsize=10)
    bwd.set_title("backward: E[(∂L/∂x)²] at each weight layer's input" + (
        "\npredicted × E[g²] measured at the output (the plan assumes 1)" if output_grad == "measured" else ""),
        fontsize=10)
    for ax in (fwd, bwd):
        ax.set_yscale("log")
        ax.set_xlabel("weight layer (order of the forward pass)")
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.grid(alpha=0.3, which="both")
    fwd.set_ylabel("second moment")
    handles, labels = fwd.get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")]
    # (the backward panel's title says when its predictions are scaled to the measured output gradient)
    labels += ["measured", "predicted (band: not flagged)" if drew_prediction else "predicted (no plan)"]
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "second moments against depth: measured (solid), predicted (dashed)", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig


def _positive(values: Sequence[float]) -> list[float]:
    return [v if v > 0 else math.nan for v in values]
