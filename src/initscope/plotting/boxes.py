"""Box plots across layers, methods side by side: weights, activations and gradients (Fig. 3 of the
Glorot/He paper), drawn from the probe's precomputed quantiles, not from the tensors.

A box spans the 25 and 75 % quantiles, the line in it is the median, the whiskers reach the 1 and
99 % quantiles (or 5 and 95 %); nothing beyond them is drawn, since the probe keeps no samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from initscope.plotting.common import (
    LABELS,
    LINSCALE,
    check_columns,
    check_quantity,
    layers_in_order,
    method_colors,
    methods_of,
    new_figure,
    save_figure,
    short_name,
    symlog_threshold,
    symlog_ticks,
    wants_symlog,
    with_method,
)

LABEL_PITCH = 0.16  # inches between two rotated 8 pt layer names
CHAR_WIDTH = 0.068  # inches per character of an 8 pt name (DejaVu Sans: digits 0.071, dots 0.035; some slack)

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


SCALES = ("auto", "linear", "symlog")


def plot_boxes(
    frame,
    *,
    quantities: Sequence[str] = ("weight", "activation", "weight_grad"),
    whiskers: str = "1-99",
    yscale: str | Mapping[str, str] = "auto",
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Per-layer box plots, one panel per quantity, methods side by side at each layer.

    Args:
        frame: the probe's table (``Probe.to_frame()``), or several concatenated with a ``method`` column.
        quantities: one panel each, top to bottom; any of the table's quantities.
        whiskers: ``"1-99"`` (``q01``/``q99``) or ``"5-95"`` (``q05``/``q95``).
        yscale: ``"auto"`` (the default: symlog where the panel's narrowest box is under 2 % of its span
            from the lowest to the highest whisker, :func:`~initscope.plotting.common.wants_symlog`; linear
            otherwise), ``"linear"`` or ``"symlog"``, for every
            panel, or a mapping from quantity to scale (panels not named are linear). A symlog axis is linear
            within a power of ten at most half the narrowest box (:func:`~initscope.plotting.common.
            symlog_threshold`: every box stays a box, a vanishing layer's 1e-7 included) and logarithmic
            beyond; its labels are 0 and powers of ten, at most six a side.
        path: if given, the figure is also saved there as PNG and SVG (see :func:`save_figure`).
        title: the figure's title; the whisker convention is appended to it.

    Per panel and method, three collections: ``boxes|<method>`` (one rectangle per layer, in forward
    order, q25 to q75), ``medians|<method>`` (one segment per layer at q50) and ``whiskers|<method>``
    (four segments per layer: box to low whisker, box to high whisker, and the two caps), so the drawn
    values can be read back (tests do) and found in the SVG. A box sits within half a unit of its
    layer's position (0, 1, ... in forward order), methods left to right in the frame's order.

    The layer names under each panel are 8 pt, cut in the middle past 24 characters; on a deep net every
    k-th layer is named (at most one name per 0.16 inch), the rest are ticks.
    """
    scales = dict(yscale) if isinstance(yscale, Mapping) else {q: yscale for q in quantities}
    for scale in scales.values():
        if scale not in SCALES:
            raise ValueError(f"yscale={scale!r} is not one of {SCALES}")
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
    plot_width = width - 1.0
    step = max(1, math.ceil(n_layers / max(1, int(plot_width / LABEL_PITCH))))  # names never closer than that
    ticks = list(range(0, n_layers, step))
    names = [short_name(layers[i]) for i in ticks]
    # rotated layer names under each panel: the longest name's length at 8 pt, and a margin
    label_room = CHAR_WIDTH * max((len(n) for n in names), default=1) + 0.35
    height = (2.2 + label_room) * len(quantities) + 0.9
    fig = new_figure(width, height)
    # Fixed margins in inches: tight_layout measures every tick label, which costs seconds on deep nets.
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=(label_room + 0.1) / height,
                        top=1 - 1.0 / height, hspace=(label_room + 0.4) / 2.2)
    axes = fig.subplots(len(quantities), 1, squeeze=False)[:, 0]
    slot = 0.8 / n_methods
    half = slot * 0.85 / 2
    for ax, quantity in zip(axes, quantities):
        spreads, extremes = [], [0.0]
        for mi, method in enumerate(methods):
            boxes, medians, whisk = [], [], []
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
                extremes += [s["whislo"], s["whishi"]]
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
        low, high = min(extremes), max(extremes)
        scale = scales.get(quantity, "linear")
        largest = max(abs(low), abs(high))
        if scale == "auto":
            scale = "symlog" if wants_symlog(spreads, low, high) else "linear"
        thresh = symlog_threshold(spreads, largest) if scale == "symlog" else None
        label = f"{LABELS[quantity]}, by layer in forward order"
        if thresh is not None:
            ax.set_yscale("symlog", linthresh=thresh, linscale=LINSCALE)
            values, texts = symlog_ticks(thresh, low, high)
            ax.yaxis.set_major_locator(FixedLocator(values))
            ax.yaxis.set_major_formatter(FixedFormatter(texts))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.autoscale_view()  # the margins again, now in the log scale's units
            label += f" (symmetric log scale: linear within ±{thresh:.0e})"
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(label, fontsize=10, loc="left")
        ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(ticks)
        ax.set_xticklabels(names, rotation=90, fontsize=8)
        if step > 1:
            ax.set_xticks(range(n_layers), minor=True)
    lo, hi = WHISKERS[whiskers]
    caption = f"box 25–75 %, line median, whiskers {int(lo[1:])}–{int(hi[1:])} % quantiles"
    if step > 1:
        caption += f"; one layer in {step} named"
    fig.suptitle(f"{title} ({caption})" if title else caption, fontsize=11, y=1 - 0.12 / height, va="top")
    if any(methods):  # one row under the title
        handles = [Patch(facecolor=(*colors[m][:3], 0.45), edgecolor=colors[m], label=m) for m in methods]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), fontsize=8,
                   frameon=False, ncol=min(n_methods, 8))
    if path is not None:
        save_figure(fig, path)
    return fig
