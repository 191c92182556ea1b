"""Interactive figures for the HTML pages: zoom, hover for a layer's name and numbers, methods toggled
from the legend, tables sorted by any column.

The figures are Plotly figure specifications (plain JSON, built here from the probe's table or a run's
history without plotly's Python API, so nothing slow is imported) drawn in the browser by plotly.js, which
the page carries inline: :func:`page_scripts` reads ``plotly.min.js`` from the installed ``plotly``
package, so the page fetches nothing when it opens and works offline. The numbers are the ones the PNG
figures of :mod:`initscope.plotting` draw, on the same scales:

- :func:`boxes_figure`: Fig. 3, boxes from the probe's precomputed quantiles (q25-q75, the median, whiskers
  q01-q99), one panel per quantity, a symmetric log axis where a panel spans orders of magnitude (the
  PNG's ``yscale="auto"``; plotly.js has no symlog axis, so values are drawn through
  :func:`~initscope.plotting.common.symlog_transform` and the ticks are labelled in the data's units);
- :func:`depth_figure`: second moments against depth, measured, predicted and the band within which a
  layer is not flagged, on log axes;
- :func:`histogram_figure`: Figs. 6 and 7, every layer's histogram (a layer chosen from a list), one panel
  per method;
- :func:`curves_figure`: Figs. 4 and 5, accuracy in % and loss against epoch.

Every function returns a dict (``data``, ``layout`` and, for histograms, what the page's script needs to
rebuild the panels); :func:`figure_html` turns one into the page's markup, and :func:`page_scripts` is
the ``<script>`` elements every page with figures carries once, at its end.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from initscope.plotting.common import (
    LABELS,
    check_columns,
    check_quantity,
    layers_in_order,
    method_colors,
    methods_of,
    symlog_threshold,
    symlog_ticks,
    symlog_transform,
    wants_symlog,
    with_method,
)

if TYPE_CHECKING:
    import pandas as pd

FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}
# The modebar's buttons all work offline (zoom, pan, autoscale, reset, save as PNG); Plotly's logo links out.
CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


# -- JSON for a page ------------------------------------------------------------------------------------------


def _clean(value):
    """NaN and infinities as null (JSON has no NaN), numpy scalars as Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(obj) -> str:
    """``obj`` as JSON that is safe inside an HTML ``<script>`` element: ``<``, ``>`` and ``&`` written as
    ``\\u003c``, ``\\u003e``, ``\\u0026`` (a layer or folder named ``</script>`` cannot end the element)."""
    text = json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _e(text) -> str:
    """Text for plotly.js's labels and hover boxes, which read a few tags (<b>, <br>): escaped."""
    return html.escape(str(text), quote=False)


def _g(value, spec: str = ".3g") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else format(v, spec)


def _rgba(color, alpha: float | None = None) -> str:
    r, g, b, a = color
    return f"rgba({round(r * 255)},{round(g * 255)},{round(b * 255)},{a if alpha is None else alpha})"


# -- box plots ------------------------------------------------------------------------------------------------

_BOX_COLUMNS = ("q01", "q05", "q25", "q50", "q75", "q95", "q99")


def boxes_figure(frame: "pd.DataFrame", *, quantities: Sequence[str] = ("weight", "activation", "weight_grad"),
                 whiskers: str = "1-99", yscale: str | Mapping[str, str] = "auto", title: str | None = None) -> dict:
    """Box plots across layers (see :func:`~initscope.plotting.plot_boxes`, whose arguments these are): one
    panel per quantity, stacked and zoomed together along the layers, methods side by side.

    Per method and panel three traces: ``bar`` (the box, q25 to q75; its hover box names the layer, its
    index and kind, and gives the median, the quartiles and the whiskers in the data's units), the median
    (a marker, the same hover) and the whiskers (lines). Layer names label the bottom panel's axis (plotly.js
    shows as many as fit and more as you zoom).
    """
    from initscope.plotting.boxes import SCALES, WHISKERS

    if whiskers not in WHISKERS:
        raise ValueError(f"whiskers={whiskers!r} is not one of {tuple(WHISKERS)}")
    scales = dict(yscale) if isinstance(yscale, Mapping) else {q: yscale for q in quantities}
    for scale in scales.values():
        if scale not in SCALES:
            raise ValueError(f"yscale={scale!r} is not one of {SCALES}")
    for q in quantities:
        check_quantity(q)
    check_columns(frame, ["layer", "index", "quantity", *_BOX_COLUMNS], "boxes_figure")
    frame = with_method(frame)
    methods, layers = methods_of(frame), layers_in_order(frame)
    colors = method_colors(methods)
    lo_col, hi_col = WHISKERS[whiskers]
    position = {name: i for i, name in enumerate(layers)}
    kinds = dict(zip(frame["layer"], frame["kind"])) if "kind" in frame else {}
    sub_all = frame[frame["quantity"].isin(list(quantities))]
    rows = {(r["method"], r["layer"], r["quantity"]): r for r in sub_all.to_dict("records")}

    n = len(quantities)
    gap = 0.09 if n > 1 else 0.0
    panel = (1.0 - gap * (n - 1)) / n
    data, annotations, layout = [], [], {}
    for qi, quantity in enumerate(quantities):
        axis = "" if qi == 0 else str(qi + 1)
        stats = []
        for method in methods:
            for layer in layers:
                r = rows.get((method, layer, quantity))
                if r is None:
                    continue
                v = [r["q25"], r["q50"], r["q75"], r[lo_col], r[hi_col]]
                if all(x is not None and x == x for x in v):
                    stats.append((method, layer, [float(x) for x in v]))
        spreads = [s[2] - s[0] for _, _, s in stats]
        extremes = [x for _, _, s in stats for x in (s[3], s[4])] or [0.0]
        low, high = min(extremes + [0.0]), max(extremes + [0.0])
        largest = max(abs(low), abs(high))
        scale = scales.get(quantity, "linear")
        if scale == "auto":
            scale = "symlog" if wants_symlog(spreads, low, high) else "linear"
        thresh = symlog_threshold(spreads, largest) if scale == "symlog" else None

        def y(values, t=thresh):
            return [float(v) for v in symlog_transform(values, t)] if t is not None else list(values)

        for method in methods:
            mine = [(layer, s) for m, layer, s in stats if m == method]
            if not mine:
                continue
            names = [layer for layer, _ in mine]
            q25, q50, q75, wlo, whi = (y([s[k] for _, s in mine]) for k in range(5))
            hover = [f"<b>{_e(layer)}</b> · #{position[layer]} {_e(kinds.get(layer, ''))}<br>{_e(method or 'probe')}"
                     f"<br>median {_g(s[1])}<br>q25–q75 {_g(s[0])} … {_g(s[2])}"
                     f"<br>{lo_col}–{hi_col} {_g(s[3])} … {_g(s[4])}" for layer, s in mine]
            color = colors[method]
            common = {"x": names, "xaxis": f"x{axis}", "yaxis": f"y{axis}", "offsetgroup": method or "probe",
                      "legendgroup": method or "probe", "name": method or "probe"}
            data.append({**common, "type": "bar", "base": q25, "y": [b - a for a, b in zip(q25, q75)],
                         "marker": {"color": _rgba(color, 0.45), "line": {"color": _rgba(color), "width": 1}},
                         "hovertext": hover, "hovertemplate": "%{hovertext}<extra></extra>",
                         "showlegend": qi == 0, "meta": "box"})
            wx, wy = [], []
            for name, a, b, c, d in zip(names, wlo, q25, q75, whi):
                wx += [name, name, None, name, name, None]
                wy += [a, b, None, c, d, None]
            data.append({**common, "type": "scatter", "mode": "lines", "x": wx, "y": wy, "showlegend": False,
                         "line": {"color": _rgba(color), "width": 1}, "hoverinfo": "skip", "meta": "whiskers"})
            data.append({**common, "type": "scatter", "mode": "markers", "y": q50, "showlegend": False,
                         "marker": {"symbol": "line-ew-open", "size": 9, "color": "black", "line": {"width": 2}},
                         "hovertext": hover, "hovertemplate": "%{hovertext}<extra></extra>", "meta": "median"})
        top = 1.0 - qi * (panel + gap)
        yaxis = {"domain": [top - panel, top], "zeroline": True, "zerolinecolor": "#bbb", "gridcolor": "#eee",
                 "automargin": True}
        label = f"{LABELS[quantity]}, by layer in forward order"
        if thresh is not None:
            values, texts = symlog_ticks(thresh, low, high)
            yaxis.update(tickmode="array", tickvals=y(values), ticktext=texts)
            label += f" (symmetric log scale: linear within ±{thresh:.0e})"
        layout[f"yaxis{axis}"] = yaxis
        layout[f"xaxis{axis}"] = {"type": "category", "categoryorder": "array", "categoryarray": layers,
                                  "anchor": f"y{axis}", "showticklabels": qi == n - 1, "tickangle": -90,
                                  "automargin": True, "tickfont": {"size": 10},
                                  **({"matches": "x"} if qi else {})}
        annotations.append({"text": _e(label), "xref": "paper", "yref": "paper", "x": 0, "y": top,
                            "xanchor": "left", "yanchor": "bottom", "showarrow": False, "font": {"size": 13}})
    # the layer axis's names are the bottom panel's: room for the longest (automargin makes it, the height
    # keeps the panels their size)
    longest = min(60, max((len(str(x)) for x in layers), default=4))
    layout.update(
        barmode="group", scattermode="group", bargap=0.25, bargroupgap=0.05, hovermode="closest",
        height=int(270 * n + 110 + 6.5 * longest), font=FONT, annotations=annotations,
        margin={"l": 70, "r": 20, "t": 70, "b": 40}, legend={"orientation": "h", "y": 1.0, "yanchor": "bottom",
                                                             "x": 1.0, "xanchor": "right"},
        title={"text": _e(title or ""), "x": 0, "font": {"size": 14}}, plot_bgcolor="white")
    return {"data": data, "layout": layout}


# -- depth ----------------------------------------------------------------------------------------------------


def depth_figure(frame: "pd.DataFrame", *, output_grad: str = "unit", title: str | None = None) -> dict:
    """Second moments against depth (see :func:`~initscope.plotting.plot_depth`, whose arguments these are):
    forward left, backward right, log axes; per method the measurement (solid, a marker per weight layer),
    the prediction (dashed) and the band within which a layer is not flagged (shaded). A measured point's
    hover box names the layer and gives measured, predicted, their ratio in bits, the band and the flag.
    """
    from initscope.plotting.depth import depth_frame, depth_series, scaled_predictions

    frame, methods, colors = depth_frame(frame, output_grad, "depth_figure")
    kinds = dict(zip(frame["layer"], frame["kind"]))
    data = []
    for method in methods:
        s = depth_series(frame, method)
        x = list(range(len(s["layers"])))
        c = colors[method]
        pred_grad, factor = scaled_predictions(s, output_grad)
        for axis, side, meas, pred, band in (("", "forward", s["meas_out"], s["pred_out"], s["band_out"]),
                                             ("2", "backward", s["meas_grad"], pred_grad, s["band_grad"])):
            group = method or "probe"
            lo = [p * 2.0 ** -b if p == p and p > 0 and b == b else None for p, b in zip(pred, band)]
            hi = [p * 2.0 ** b if p == p and p > 0 and b == b else None for p, b in zip(pred, band)]
            if any(v is not None for v in lo):
                data.append({"type": "scatter", "mode": "lines", "x": x, "y": lo, "line": {"width": 0},
                             "xaxis": f"x{axis}", "yaxis": f"y{axis}", "legendgroup": group, "showlegend": False,
                             "hoverinfo": "skip", "meta": f"band-low-{side}"})
                data.append({"type": "scatter", "mode": "lines", "x": x, "y": hi, "line": {"width": 0},
                             "fill": "tonexty", "fillcolor": _rgba(c, 0.12), "xaxis": f"x{axis}",
                             "yaxis": f"y{axis}", "legendgroup": group, "showlegend": False, "hoverinfo": "skip",
                             "meta": f"band-{side}"})
            hover = []
            for i, name in enumerate(s["layers"]):
                m, p, b = meas[i], pred[i], band[i]
                bits = math.log2(m / p) if m == m and p == p and m > 0 and p > 0 else math.nan
                off = bits == bits and b == b and abs(bits) > b
                scaled = (f" (plan × E[g²] at the output, {_g(factor)})" if side == "backward" and factor != 1.0
                          else "")
                hover.append(f"<b>{_e(name)}</b> · weight layer {i} {_e(kinds.get(name, ''))}<br>{_e(group)}"
                             f"<br>measured {_g(m)}<br>predicted {_g(p)}{scaled}<br>log2 ratio {_g(bits, '+.2f')} bits"
                             + (f" (band ±{_g(b, '.2f')})" if b == b else "") + ("<br><b>flagged</b>" if off else ""))
            data.append({"type": "scatter", "mode": "lines+markers", "x": x, "y": [v if v > 0 else None for v in meas],
                         "line": {"color": _rgba(c), "width": 2}, "marker": {"size": 5}, "name": f"{group}",
                         "xaxis": f"x{axis}", "yaxis": f"y{axis}", "legendgroup": group, "showlegend": axis == "",
                         "hovertext": hover, "hovertemplate": "%{hovertext}<extra></extra>",
                         "meta": f"measured-{side}"})
            if any(v == v for v in pred):
                data.append({"type": "scatter", "mode": "lines", "x": x, "y": [v if v > 0 else None for v in pred],
                             "line": {"color": _rgba(c), "width": 1.5, "dash": "dash"},
                             "name": f"{group}, predicted", "xaxis": f"x{axis}", "yaxis": f"y{axis}",
                             "legendgroup": group, "showlegend": axis == "", "hovertext": hover,
                             "hovertemplate": "%{hovertext}<extra>predicted</extra>", "meta": f"predicted-{side}"})
    backward = "backward: E[(∂L/∂x)²] at each weight layer's input"
    if output_grad == "measured":
        backward += "<br><sub>predicted × E[g²] measured at the output (the plan assumes 1)</sub>"
    axis = {"type": "log", "exponentformat": "power", "gridcolor": "#eee", "automargin": True}
    n_layers = max([len(depth_series(frame, m)["layers"]) for m in methods] + [1])
    layer_axis = {"title": {"text": "weight layer (forward order)"}, "zeroline": False, "gridcolor": "#eee",
                  "tickmode": "linear", "tick0": 0, "dtick": max(1, math.ceil(n_layers / 12))}
    layout = {
        "xaxis": {**layer_axis, "domain": [0, 0.46], "anchor": "y"},
        "xaxis2": {**layer_axis, "domain": [0.54, 1], "anchor": "y2", "matches": "x"},
        "yaxis": {**axis, "title": {"text": "second moment"}}, "yaxis2": {**axis, "anchor": "x2"},
        "annotations": [
            {"text": "forward: E[u²] at each weight layer's output", "xref": "paper", "yref": "paper", "x": 0,
             "y": 1.0, "xanchor": "left", "yanchor": "bottom", "showarrow": False, "font": {"size": 13}},
            {"text": backward, "xref": "paper", "yref": "paper", "x": 0.54, "y": 1.0, "xanchor": "left",
             "yanchor": "bottom", "showarrow": False, "font": {"size": 13}, "align": "left"}],
        "title": {"text": _e(title or "measured (solid), predicted (dashed), shaded: not flagged"), "x": 0,
                  "font": {"size": 14}},
        "height": 470, "hovermode": "closest", "font": FONT, "plot_bgcolor": "white",
        "margin": {"l": 70, "r": 20, "t": 100, "b": 50},
        "legend": {"orientation": "h", "y": -0.18, "yanchor": "top"},
    }
    return {"data": data, "layout": layout}


# -- histograms -----------------------------------------------------------------------------------------------


def histogram_figure(frame: "pd.DataFrame", quantity: str = "activation", *, initial: str | None = None, log: bool = True,
                     title: str | None = None) -> dict:
    """Every layer's histogram of ``quantity`` (see :func:`~initscope.plotting.plot_histograms`): one panel
    per method, side by side, each on its own range; the page shows one layer at a time, chosen from a list
    of every layer (with previous and next), ``initial`` first (default: the last layer for a forward
    quantity, the first for a gradient: where each pass ends). A bar's hover box gives the layer, the method,
    the bin and its count.

    The counts travel once, compactly (``hist``: method -> layer -> [lo, hi, counts]); the page's script
    builds the bars of the layer shown.
    """
    from initscope.plotting.histograms import hist_counts

    check_quantity(quantity)
    check_columns(frame, ["layer", "index", "quantity", "hist_lo", "hist_hi", "hist_counts"], "histogram_figure")
    frame = with_method(frame)
    methods = methods_of(frame)
    sub = frame[frame["quantity"] == quantity]
    hist: dict[str, dict[str, list]] = {}
    for r in sub.to_dict("records"):
        counts = hist_counts(r["hist_counts"])
        if len(counts):
            hist.setdefault(r["method"] or "probe", {})[r["layer"]] = [float(r["hist_lo"]), float(r["hist_hi"]),
                                                                       [int(c) for c in counts]]
    have = {layer for per in hist.values() for layer in per}
    layers = [name for name in layers_in_order(frame) if name in have]
    if not layers:
        raise ValueError(f"no layer has a histogram of {quantity!r} (probed with histograms=False, or no such rows)")
    if initial not in have:
        initial = layers[0] if quantity.endswith("grad") else layers[-1]
    colors = method_colors(methods)
    n = len(methods)
    gap = 0.06 if n > 1 else 0.0
    width = (1.0 - gap * (n - 1)) / n
    layout = {"font": FONT, "height": 330, "plot_bgcolor": "white", "showlegend": False, "hovermode": "closest",
              "bargap": 0, "margin": {"l": 60, "r": 20, "t": 60, "b": 45},
              "title": {"text": _e(title or f"histograms of {LABELS[quantity]}"), "x": 0, "font": {"size": 14}}}
    annotations = []
    for i, method in enumerate(methods):
        axis = "" if i == 0 else str(i + 1)
        left = i * (width + gap)
        layout[f"xaxis{axis}"] = {"domain": [left, left + width], "anchor": f"y{axis}", "exponentformat": "e",
                                  "gridcolor": "#eee", "nticks": 6}
        layout[f"yaxis{axis}"] = {"anchor": f"x{axis}", "type": "log" if log else "linear", "gridcolor": "#eee",
                                  "exponentformat": "power", **({"dtick": 1} if log else {}),
                                  **({"title": {"text": "count"}} if i == 0 else {})}
        annotations.append({"text": _e(method or "probe"), "xref": "paper", "yref": "paper", "x": left,
                            "y": 1.0, "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                            "font": {"size": 13, "color": _rgba(colors[method])}})
    layout["annotations"] = annotations
    return {"kind": "histograms", "data": [], "layout": layout, "methods": [m or "probe" for m in methods],
            "colors": {m or "probe": _rgba(colors[m], 0.85) for m in methods}, "layers": layers, "hist": hist,
            "initial": initial, "quantity": LABELS[quantity]}


# -- training curves ------------------------------------------------------------------------------------------


def curves_figure(history: "pd.DataFrame | Sequence[Mapping]", *, title: str | None = None) -> dict:
    """Accuracy in % (left) and loss (right) against epoch (see :func:`~initscope.plotting.
    plot_training_curves`): validation solid with dots, training dashed with open squares, whole epochs on
    the axis (a one-epoch run: that epoch's tick alone); a point's hover box gives the run (label), the split,
    the epoch and the value; the loss axis is logarithmic where the losses span more than 100 times."""
    import pandas as pd

    from initscope.plotting.curves import SPLITS, accuracy_percent, history_frame, loss_scale

    frame, labels, colors = history_frame(history, "curves_figure")
    data = []
    longest = 1
    for label in labels:
        run = frame[frame["label"] == label].sort_values("epoch", kind="stable")
        longest = max(longest, len(run))
        epochs = [int(e) for e in run["epoch"]]
        for axis, metric, unit in (("", "accuracy", " %"), ("2", "loss", "")):
            for split, name, style, marker in SPLITS:
                values = run[f"{split}_{metric}"].to_numpy()
                y = accuracy_percent(values) if metric == "accuracy" else pd.to_numeric(
                    pd.Series(values), errors="coerce").astype(float)
                y = [float(v) if v == v and abs(v) != float("inf") else None for v in y]
                data.append({
                    "type": "scatter", "mode": "lines+markers", "x": epochs, "y": y, "xaxis": f"x{axis}",
                    "yaxis": f"y{axis}", "name": f"{label or 'run'}, {name}", "legendgroup": label or "run",
                    "showlegend": axis == "",
                    "line": {"color": _rgba(colors[label]), "dash": "solid" if style == "-" else "dash",
                             "width": 2},
                    "marker": {"symbol": "circle" if marker == "o" else "square-open", "size": 7},
                    "hovertemplate": f"<b>{_e(label or 'run')}</b>, {name}<br>epoch %{{x}}: %{{y:.4g}}{unit}"
                                     "<extra></extra>",
                    "meta": f"{metric}|{split}|{label}"})
    epoch_axis = {"tickmode": "linear", "tick0": 0, "dtick": max(1, math.ceil(longest / 10)),
                  "title": {"text": "epoch"}, "gridcolor": "#eee", "zeroline": False}
    if longest == 1:  # one epoch: its tick alone, the points in the middle (no epoch 0 or 2 on the axis)
        epochs = sorted({int(e) for e in pd.to_numeric(frame["epoch"], errors="coerce").dropna()})
        if epochs:
            epoch_axis.update(tickmode="array", tickvals=epochs, range=[epochs[0] - 1, epochs[-1] + 1])
    return {"data": data, "layout": {
        "xaxis": {**epoch_axis, "domain": [0, 0.45], "anchor": "y"},
        "xaxis2": {**epoch_axis, "domain": [0.55, 1], "anchor": "y2", "matches": "x"},
        "yaxis": {"title": {"text": "accuracy (%)"}, "gridcolor": "#eee", "anchor": "x"},
        "yaxis2": {"title": {"text": "loss"}, "gridcolor": "#eee", "anchor": "x2", "type": loss_scale(frame)},
        "title": {"text": _e(title or "training (dashed) and validation (solid)"), "x": 0, "font": {"size": 14}},
        "height": 400, "font": FONT, "plot_bgcolor": "white", "hovermode": "closest",
        "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "legend": {"font": {"size": 11}}}}


def depth_accuracy_figure(table: "pd.DataFrame", *, title: str | None = None) -> dict:
    """Test accuracy (%) against depth (see :func:`~initscope.plotting.depth_accuracy.plot_accuracy_vs_depth`):
    a panel per epoch, a line per method with its 95 % interval as error bars; the hover box gives the method,
    the model, its weight layers, the mean, the interval and n."""
    epochs = list(dict.fromkeys(table["epoch"]))
    colors = method_colors(list(dict.fromkeys(table["method"])))
    depths = sorted(int(d) for d in table["depth"].unique())
    data, layout = [], {}
    width = 1.0 / len(epochs)
    for i, epoch in enumerate(epochs):
        axis = "" if i == 0 else str(i + 1)
        for method, rows in table[table["epoch"] == epoch].groupby("method", sort=False):
            rows = rows.sort_values("depth")
            mean = [float(v) for v in rows["mean"]]
            data.append({
                "type": "scatter", "mode": "lines+markers", "x": [int(d) for d in rows["depth"]], "y": mean,
                "xaxis": f"x{axis}", "yaxis": f"y{axis}", "name": str(method), "legendgroup": str(method),
                "showlegend": i == 0, "line": {"color": _rgba(colors[method]), "width": 2},
                "error_y": {"type": "data", "symmetric": False,
                            "array": [_clean(h - m) for h, m in zip(rows["high"], mean)],
                            "arrayminus": [_clean(m - lo) for lo, m in zip(rows["low"], mean)]},
                "customdata": [[str(mo), _g(lo, ".1f"), _g(h, ".1f"), int(n)]
                               for mo, lo, h, n in zip(rows["model"], rows["low"], rows["high"], rows["n"])],
                "hovertemplate": f"<b>{_e(method)}</b>, %{{customdata[0]}} (%{{x}} weight layers)<br>"
                                 "test accuracy %{y:.1f} % (CI %{customdata[1]}–%{customdata[2]}, n=%{customdata[3]})"
                                 "<extra></extra>"})
        layout[f"xaxis{axis}"] = {"type": "log", "tickvals": depths, "ticktext": [str(d) for d in depths],
                                  "title": {"text": "weight layers"}, "domain": [i * width + 0.04, (i + 1) * width - 0.04],
                                  "anchor": f"y{axis}", "gridcolor": "#eee"}
        layout[f"yaxis{axis}"] = {"title": {"text": "test accuracy (%)" if i == 0 else ""}, "anchor": f"x{axis}",
                                  "gridcolor": "#eee", **({"matches": "y"} if i else {})}
    annotations = [{"text": "best-validation checkpoint" if e == "best" else f"after epoch {e}", "showarrow": False,
                    "xref": "paper", "yref": "paper", "x": (i + 0.5) * width, "y": 1.02, "xanchor": "center",
                    "yanchor": "bottom"} for i, e in enumerate(epochs)]
    return {"data": data, "layout": {
        **layout, "annotations": annotations, "height": 400, "font": FONT, "plot_bgcolor": "white",
        "hovermode": "closest", "title": {"text": _e(title or "test accuracy against depth"), "x": 0,
                                          "font": {"size": 14}},
        "margin": {"l": 60, "r": 20, "t": 70, "b": 50}, "legend": {"font": {"size": 11}}}}


# -- the page's markup ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageFigure:
    """One figure of the page: its title, a caption saying what is drawn, and the PNG bytes."""

    title: str
    caption: str
    png: bytes
    width: int
    height: int


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24), so the page can reserve the space."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        raise ValueError("not a PNG file (bad signature)")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def page_figure(title: str, caption: str, png: bytes) -> PageFigure:
    width, height = png_size(png)
    return PageFigure(title, caption, png, width, height)


def static_figures(figures: Sequence[PageFigure], *, open_: bool = False) -> str:
    """The static figures (the PNGs written beside the page for papers), embedded as base64, in a
    collapsible block: the page's fallback, and what prints."""
    if not figures:
        return ""
    parts = [f'<details class="static"{" open" if open_ else ""}><summary>Static figures (the PNGs beside this '
             "page; SVG copies there too)</summary>"]
    for i, fig in enumerate(figures):
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(
            f'<figure id="figure-{i}">' + (f"<h3>{html.escape(str(fig.title), quote=True)}</h3>" if fig.title else "") +
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(str(fig.title or fig.caption), quote=True)}" '
            f'width="{fig.width}" height="{fig.height}">'
            f"<figcaption>{html.escape(str(fig.caption), quote=True)}</figcaption></figure>"
        )
    parts.append("</details>")
    return "".join(parts)




def figure_html(spec: dict, fig_id: str, *, title: str = "", caption: str = "", links: Sequence[tuple[str, str]] = ()
                ) -> str:
    """One interactive figure: a heading, the plot's ``<div>`` (drawn by :func:`page_scripts`' script from the
    JSON beside it), for histograms the layer chooser, a caption, and links to static copies (``links``:
    (text, relative path), e.g. the PNG and SVG written beside the page)."""
    out = [f'<figure class="interactive" id="{html.escape(fig_id)}">']
    if title:
        out.append(f"<h3>{html.escape(title)}</h3>")
    if spec.get("kind") == "histograms":
        options = "".join(
            f'<option value="{i}"{" selected" if name == spec["initial"] else ""}>{i}: {html.escape(name)}</option>'
            for i, name in enumerate(spec["layers"]))
        out.append(f'<div class="chooser">layer <button type="button" data-step="-1" aria-label="previous layer">◀'
                   f'</button><select aria-label="layer">{options}</select><button type="button" data-step="1" '
                   f'aria-label="next layer">▶</button> <span class="note">{len(spec["layers"])} layers, in forward '
                   "order</span></div>")
    out.append(f'<div class="plot" data-spec="{html.escape(fig_id)}-spec"></div>')
    out.append(f'<script type="application/json" id="{html.escape(fig_id)}-spec">{to_json(spec)}</script>')
    text = html.escape(caption)
    if links:
        text += " Static copies for papers: " + " · ".join(
            f'<a href="{html.escape(href)}">{html.escape(name)}</a>' for name, href in links) + "."
    if text:
        out.append(f"<figcaption>{text}</figcaption>")
    out.append("</figure>")
    return "".join(out)


STYLE = """
figure.interactive { margin: 1em 0 2.2em; } figure.interactive .plot { min-height: 120px; }
.chooser { margin: .3em 0; } .chooser select { max-width: 40em; margin: 0 .3em; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; font-size: .8em; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; font-size: .8em; }
.nojs { color: #b00020; }
"""

# The page's own script: draws every figure from its JSON, wires the histogram choosers, makes tables sortable.
# It marks the document when every figure is drawn (data-figures="drawn", or "failed"): tests wait for it.
_PAGE_JS = r"""
(function () {
  "use strict";
  var CONFIG = %CONFIG%;
  var root = document.documentElement;
  function histData(s, layer) {
    return s.methods.map(function (m, i) {
      var h = (s.hist[m] || {})[layer], k = i ? String(i + 1) : "";
      var t = {type: "bar", x: [], y: [], xaxis: "x" + k, yaxis: "y" + k, name: m, meta: "hist|" + m,
               marker: {color: s.colors[m]}, hovertemplate: "%{hovertext}<extra></extra>", hovertext: [],
               textposition: "none"};
      if (!h) { return t; }
      var lo = h[0], hi = h[1], counts = h[2], w = (hi - lo) / counts.length || 1;
      t.width = w;
      for (var j = 0; j < counts.length; j++) {
        var a = lo + j * w;
        t.x.push(a + w / 2); t.y.push(counts[j]);
        t.hovertext.push("<b>" + esc(layer) + "</b> · " + esc(m) + "<br>[" + a.toPrecision(3) + ", " +
                    (a + w).toPrecision(3) + "): " + counts[j]);
      }
      return t;
    });
  }
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function histLayout(s, layer) {
    var layout = JSON.parse(JSON.stringify(s.layout));
    layout.title.text = layout.title.text + ": <b>" + esc(layer) + "</b>";
    return layout;
  }
  function drawHist(div, s, index) {
    var layer = s.layers[index];
    return Plotly.react(div, histData(s, layer), histLayout(s, layer), CONFIG);
  }
  var drawn = [];
  Array.prototype.forEach.call(document.querySelectorAll("div.plot[data-spec]"), function (div) {
    var s = JSON.parse(document.getElementById(div.getAttribute("data-spec")).textContent);
    if (s.kind === "histograms") {
      var fig = div.parentNode, select = fig.querySelector("select");
      drawn.push(drawHist(div, s, s.layers.indexOf(s.initial)));
      select.addEventListener("change", function () { drawHist(div, s, Number(select.value)); });
      Array.prototype.forEach.call(fig.querySelectorAll("button[data-step]"), function (b) {
        b.addEventListener("click", function () {
          var i = Math.min(s.layers.length - 1, Math.max(0, Number(select.value) + Number(b.getAttribute("data-step"))));
          select.value = String(i);
          drawHist(div, s, i);
        });
      });
    } else {
      drawn.push(Plotly.newPlot(div, s.data, s.layout, CONFIG));
    }
  });
  Promise.all(drawn).then(function () { root.setAttribute("data-figures", "drawn"); },
                          function (e) { root.setAttribute("data-figures", "failed"); console.error(e); });

  // Sortable tables: a click on a column's head sorts the body's rows by it (numbers as numbers, "–" last);
  // a second click reverses. A cell's data-sort attribute, where present, is its key.
  function key(cell) {
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    var m = /[-+\u2212]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?/.exec(raw.replace(/\u2212/g, "-"));
    return m ? {n: parseFloat(m[0]), t: raw} : {n: NaN, t: raw.trim()};
  }
  function compare(a, b) {
    if (!isNaN(a.n) && !isNaN(b.n)) { return a.n - b.n; }
    if (isNaN(a.n) !== isNaN(b.n)) { return isNaN(a.n) ? 1 : -1; }
    return a.t.localeCompare(b.t);
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead ? table.tHead.rows[table.tHead.rows.length - 1].cells : [];
    Array.prototype.forEach.call(heads, function (th, col) {
      th.setAttribute("title", "sort by this column");
      th.addEventListener("click", function () {
        var body = table.tBodies[0], desc = th.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", desc ? "descending" : "ascending");
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var c = compare(key(r1.cells[col]), key(r2.cells[col]));
          if (isNaN(key(r1.cells[col]).n) || isNaN(key(r2.cells[col]).n)) { return c; }
          return desc ? -c : c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js, minified, from the installed ``plotly`` package (its own copy: no network)."""
    from importlib import resources

    try:
        path = resources.files("plotly") / "package_data" / "plotly.min.js"
        return path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover - plotly is a dependency
        raise RuntimeError("the interactive pages need plotly.js from the `plotly` package: pip install plotly") from exc


def plotly_version() -> str:
    head = plotly_js()[:200]
    return head.split("plotly.js v", 1)[1].split()[0] if "plotly.js v" in head else "?"


def page_scripts() -> str:
    """The scripts a page with interactive figures ends with: plotly.js, then the page's own script (draws
    the figures, the histogram choosers, sortable tables). Inline, nothing fetched. Put just before
    ``</body>``, after every figure's markup."""
    js = plotly_js().replace("</script", "<\\/script")
    own = _PAGE_JS.replace("%CONFIG%", json.dumps(CONFIG))
    return f"<script>{js}</script>\n<script>{own}</script>"


def sort_script_only() -> str:
    """The page's script without plotly.js, for a page with sortable tables and no figure."""
    return f"<script>{_PAGE_JS.replace('%CONFIG%', json.dumps(CONFIG))}</script>"


NOSCRIPT = ('<noscript><p class="nojs">The figures on this page are drawn by JavaScript, which is off: the static '
            "figures below (and the PNG and SVG files beside the page) show the same numbers.</p></noscript>")
