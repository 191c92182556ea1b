"""Box plots across layers, methods side by side: weights, activations and gradients (Fig. 3 of the
Glorot/He paper), drawn from the probe's precomputed quantiles, not from the tensors.

A box spans the 25 and 75 % quantiles, the line in it is the median, the whiskers reach the 1 and
99 % quantiles (or 5 and 95 %); nothing beyond them is drawn, since the probe keeps no samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from initscope.plotting.common import (
    LABELS,
    check_columns,
    check_quantity,
    layers_in_order,
    method_colors,
    methods_of,
    new_figure,
    save_figure,
    with_method,
)

WHISKERS = {"1-99": ("q01", "q99"), "5-95": ("q05", "q95")}


def box_stats(row: dict, whiskers: str = "1-99") -> dict | None:
    """One box's statistics (``Axes.bxp``'s keys), or None when the row has no finite quantiles."""
    lo, hi = WHISKERS[whiskers]
    stats = {"med": row["q50"], "q1": row["q25"], "q3": row["q75"], "whislo": row[lo], "whishi": row[hi]}
    if any(v is None or v != v for v in stats.values()):  # NaN: quantiles were not taken
        return None
    stats = {k: float(v) for k, v in stats.items()}
    stats["fliers"] = []
    return stats


def plot_boxes(
    frame,
    *,
    quantities: Sequence[str] = ("weight", "activation", "weight_grad"),
    whiskers: str = "1-99",
    yscale: str | Mapping[str, str] = "linear",
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Per-layer box plots, one panel per quantity, methods side by side at each layer.

    Args:
        frame: the probe's table (``Probe.to_frame()``), or several concatenated with a ``method`` column.
        quantities: one panel each, top to bottom; any of the table's quantities.
        whiskers: ``"1-99"`` (``q01``/``q99``) or ``"5-95"`` (``q05``/``q95``).
        yscale: ``"linear"`` or ``"symlog"`` (linear within the smallest box's half-height of zero,
            logarithmic beyond: for nets whose layers differ by orders of magnitude), for every panel,
            or a mapping from quantity to scale (panels not named are linear).
        path: if given, the figure is also saved there as PNG and SVG (see :func:`save_figure`).
        title: the figure's title; the whisker convention is appended to it.

    Per panel and method, three collections: ``boxes|<method>`` (one rectangle per layer, in forward
    order, q25 to q75), ``medians|<method>`` (one segment per layer at q50) and ``whiskers|<method>``
    (four segments per layer: box to low whisker, box to high whisker, and the two caps), so the drawn
    values can be read back (tests do) and found in the SVG. A box sits within half a unit of its
    layer's position (0, 1, ... in forward order), methods left to right in the frame's order.
    """
    scales = dict(yscale) if isinstance(yscale, Mapping) else {q: yscale for q in quantities}
    for scale in scales.values():
        if scale not in ("linear", "symlog"):
            raise ValueError(f"yscale={scale!r} is not one of ('linear', 'symlog')")
    if whiskers not in WHISKERS:
        raise ValueError(f"whiskers={whiskers!r} is not one of {tuple(WHISKERS)}")
    for q in quantities:
        check_quantity(q)
    check_columns(frame, ["layer", "index", "quantity", "q01", "q05", "q25", "q50", "q75", "q95", "q99"], "plot_boxes")
    frame = with_method(frame)
    methods = methods_of(frame)
    layers = layers_in_order(frame)
    colors = method_colors(methods)
    rows = {(r["method"], r["layer"], r["quantity"]): r for r in frame.to_dict("records")}

    n_layers, n_methods = len(layers), len(methods)
    width = min(20.0, max(8.0, 1.6 + 0.09 * n_layers * max(n_methods, 2)))
    label_room = 0.045 * max(len(name) for name in layers) + 0.3  # rotated layer names under each panel
    height = (2.2 + label_room) * len(quantities) + 0.9
    fig = new_figure(width, height)
    # Fixed margins in inches: tight_layout measures every tick label, which costs seconds on deep nets.
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=(label_room + 0.35) / height,
                        top=1 - 1.0 / height, hspace=(label_room + 0.35) / 2.2)
    axes = fig.subplots(len(quantities), 1, squeeze=False)[:, 0]
    slot = 0.8 / n_methods
    half = slot * 0.85 / 2
    for ax, quantity in zip(axes, quantities):
        spreads = []
        for mi, method in enumerate(methods):
            boxes, medians, whisk, names = [], [], [], []
            for li, layer in enumerate(layers):
                row = rows.get((method, layer, quantity))
                s = box_stats(row, whiskers) if row is not None else None
                if s is None:
                    continue
                x = li - 0.4 + slot * (mi + 0.5)
                boxes.append([(x - half, s["q1"]), (x + half, s["q1"]), (x + half, s["q3"]), (x - half, s["q3"])])
                medians.append([(x - half, s["med"]), (x + half, s["med"])])
                whisk += [[(x, s["q1"]), (x, s["whislo"])], [(x, s["q3"]), (x, s["whishi"])],
                          [(x - half / 2, s["whislo"]), (x + half / 2, s["whislo"])],
                          [(x - half / 2, s["whishi"]), (x + half / 2, s["whishi"])]]
                spreads.append(s["q3"] - s["q1"])
                names.append(layer)
            if not boxes:
                continue
            # Three collections per method and panel rather than six artists per box: a deep net's
            # figure has hundreds of boxes, and drawing them one by one takes seconds.
            color = colors[method]
            ax.add_collection(LineCollection(whisk, colors=[color], linewidths=0.8, gid=f"whiskers|{method}"))
            ax.add_collection(PolyCollection(boxes, facecolors=[(*color[:3], 0.45)], edgecolors=[color],
                                             linewidths=0.8, gid=f"boxes|{method}"))
            ax.add_collection(LineCollection(medians, colors="k", linewidths=1.0, gid=f"medians|{method}"))
        ax.autoscale_view()
        positive = [d for d in spreads if d > 0]
        if scales.get(quantity, "linear") == "symlog" and positive:
            ax.set_yscale("symlog", linthresh=min(positive) / 2)
        ax.set_title(f"{LABELS[quantity]}, by layer in forward order", fontsize=10, loc="left")
        ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.grid(axis="y", alpha=0.3)
        step = max(1, n_layers // 40)  # keep the tick labels legible on deep nets
        ticks = list(range(0, n_layers, step))
        ax.set_xticks(ticks)
        ax.set_xticklabels([layers[i] for i in ticks], rotation=90, fontsize=6)
    lo, hi = WHISKERS[whiskers]
    caption = f"box 25–75 %, line median, whiskers {int(lo[1:])}–{int(hi[1:])} % quantiles"
    fig.suptitle(f"{title} ({caption})" if title else caption, fontsize=11, y=1 - 0.12 / height, va="top")
    if any(methods):  # one row under the title
        handles = [Patch(facecolor=(*colors[m][:3], 0.45), edgecolor=colors[m], label=m) for m in methods]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), fontsize=8,
                   frameon=False, ncol=min(n_methods, 8))
    if path is not None:
        save_figure(fig, path)
    return fig
