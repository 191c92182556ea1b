"""The comparison report as one self-contained HTML page.

Everything the page shows is inside the file: the interactive figures (:mod:`initscope.plotting.web`:
plotly.js and the page's own short script inline, the numbers as JSON), the static PNG figures as base64
``data:`` URLs (under "Static figures"), the style sheet; no font, script or link to fetch. It opens
from a USB stick on a machine with no network. Tables sort by any column (a click on its head).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd

from initscope.plotting import web
# The static figures' pieces are the pages' (the report's too): they live beside the interactive ones.
from initscope.plotting.web import PageFigure, page_figure, png_size, static_figures  # noqa: F401


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1400px; padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; position: sticky; top: 0; }
td.name, th.name { text-align: left; }
table.meta td, table.meta th { text-align: left; }
tr.flag td { background: #fde2e1; } td.off { color: #b00020; font-weight: 600; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; max-width: 80em; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
.note { color: #555; max-width: 80em; } .scroll { overflow-x: auto; }
details.static figure img { max-width: 100%; }
""" + web.STYLE


@dataclass(frozen=True)
class InteractiveFigure:
    """One interactive figure of the page: its name (the element's id), title, caption, the Plotly spec
    (:mod:`initscope.plotting.web`) and links to its static copies ((text, relative path) pairs)."""

    name: str
    title: str
    caption: str
    spec: dict
    links: tuple[tuple[str, str], ...] = ()


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(v):
        return "–"
    return format(v, spec)


def _ratio_cell(value) -> str:
    """A measured/predicted ratio; outside [1/2, 2] it is marked (the probe's flag threshold)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "<td>–</td>"
    if math.isnan(v):
        return "<td>–</td>"
    off = not (0.5 <= v <= 2.0)
    return f'<td class="off">{v:.3g}</td>' if off else f"<td>{v:.3g}</td>"


def check_table(frame: pd.DataFrame, method: str) -> str:
    """Measured against predicted, one row per weight layer (``weight_layer``) of one method; flagged rows
    highlighted.

    A layer is flagged when either ratio (measured / predicted second moment) lies outside the band the
    plan's draw-to-draw spread allows (:func:`initscope.probe.flag_limit`); a layer with non-finite values
    anywhere is flagged too, so a NaN never passes silently.
    """
    sub = frame[frame["method"] == method]
    weight_layers = sub[sub["weight_layer"].astype(bool)]
    nonfinite = sub.groupby("layer", sort=False)["nonfinite"].sum()
    first = weight_layers.sort_values("index", kind="stable").drop_duplicates("layer")
    head = ("#", "layer", "kind", "pred E[u²]", "meas E[u²]", "ratio", "pred E[g²]", "meas E[g²]", "ratio",
            "non-finite", "flag")
    out = ['<div class="scroll"><table class="check sortable"><thead><tr>']
    out += [f'<th class="name">{h}</th>' if h in ("layer", "kind") else f"<th>{h}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in first.to_dict("records"):
        bad = int(nonfinite.get(r["layer"], 0))
        flagged = bool(r.get("flagged", False)) or bad > 0
        out.append('<tr class="flag">' if flagged else "<tr>")
        out.append(f"<td>{int(r['index'])}</td><td class=\"name\">{_e(r['layer'])}</td><td class=\"name\">{_e(r['kind'])}</td>")
        out.append(f"<td>{_num(r.get('pred_out_var'))}</td><td>{_num(r.get('meas_out_var'))}</td>")
        out.append(_ratio_cell(r.get("out_ratio")))
        out.append(f"<td>{_num(r.get('pred_in_grad_var'))}</td><td>{_num(r.get('meas_in_grad_var'))}</td>")
        out.append(_ratio_cell(r.get("in_grad_ratio")))
        out.append(f'<td class="off">{bad}</td>' if bad else "<td>0</td>")
        out.append(f"<td>{'flagged' if flagged else ''}</td></tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def summary_rows(frame: pd.DataFrame, methods: Sequence[str]) -> list[dict]:
    """Per method: weight layers, flagged layers, and the worst |log2(measured / predicted)| each way."""
    rows = []
    for method in methods:
        sub = frame[(frame["method"] == method) & frame["weight_layer"].astype(bool)].drop_duplicates("layer")
        nonfinite = frame[frame["method"] == method].groupby("layer")["nonfinite"].sum()
        flagged = sum(bool(f) or nonfinite.get(n, 0) > 0 for n, f in zip(sub["layer"], sub["flagged"]))

        def worst(col: str) -> float:
            vals = [abs(math.log2(v)) for v in sub[col].astype(float) if v > 0 and math.isfinite(v)]
            return max(vals) if vals else math.nan

        rows.append({"method": method, "layers": len(sub), "flagged": flagged,
                     "worst_fwd": worst("out_ratio"), "worst_bwd": worst("in_grad_ratio")})
    return rows


def plan_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ['<div class="scroll"><table class="plan sortable"><thead><tr>']
    out += [f'<th class="name">{_e(c)}</th>' if i < 2 else f"<th>{_e(c)}</th>" for i, c in enumerate(columns)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="name">{_e(c)}</td>' if i < 2 else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_page(
    meta: Mapping[str, str],
    frame: pd.DataFrame,
    plans: Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]], Sequence[str]]],
    figures: Sequence[PageFigure],
    notes: Sequence[str] = (),
    interactive: Sequence[InteractiveFigure] = (),
) -> str:
    """The whole page as a string.

    Args:
        meta: the "what was run" header, label -> value, shown in order.
        frame: the concatenated probe table (with a ``method`` column).
        plans: method -> (column titles, rows of strings, notes) of its plan table.
        figures: the static figures, embedded in order as base64 PNG under "Static figures".
        notes: paragraphs under the header (how the loss was made, what a flag means).
        interactive: the interactive figures, in order, under "Figures" (with plotly.js inline; without
            any, the page carries only its short script for sorting tables).
    """
    methods = list(dict.fromkeys(frame["method"].astype(str)))
    title = f"initscope · {meta.get('model', '')} · {len(methods)} initializations compared"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<section id="run"><h2>What was run</h2><table class="meta"><tbody>',
    ]
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta.items()]
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    parts.append("</section>")

    parts.append('<section id="summary"><h2>Summary</h2><table class="sortable"><thead><tr><th class="name">method</th>'
                 "<th>weight layers</th><th>flagged</th><th>worst |log2 ratio| forward</th>"
                 "<th>worst |log2 ratio| backward</th></tr></thead><tbody>")
    for s in summary_rows(frame, methods):
        cls = ' class="flag"' if s["flagged"] else ""
        parts.append(f'<tr{cls}><td class="name">{_e(s["method"])}</td><td>{s["layers"]}</td><td>{s["flagged"]}</td>'
                     f"<td>{_num(s['worst_fwd'], '.2f')}</td><td>{_num(s['worst_bwd'], '.2f')}</td></tr>")
    parts.append("</tbody></table></section>")

    parts.append('<section id="figures"><h2>Figures</h2>')
    if interactive:
        parts.append('<p class="note">Drag to zoom (the panels of one figure zoom together), double-click to '
                     "zoom out, hover for a layer's name and numbers, click a method in the legend to hide or show "
                     "it; the camera icon saves a PNG.</p>" + web.NOSCRIPT)
    for fig in interactive:
        parts.append(web.figure_html(fig.spec, f"fig-{fig.name}", title=fig.title, caption=fig.caption,
                                     links=fig.links))
    parts.append(static_figures(figures, open_=not interactive))
    parts.append("</section>")

    parts.append('<section id="check"><h2>Measured against predicted, per weight layer</h2>'
                 '<p class="note">E[u²]: second moment of the layer\'s output; E[g²]: second moment of the '
                 "gradient at the layer's input. Ratio = measured / predicted; rows are flagged (red) when a "
                 "ratio lies outside the plan's predicted spread (the band on the depth plot) or a tensor of the "
                 "layer holds non-finite values.</p>")
    for i, method in enumerate(methods):
        open_ = " open" if i == 0 else ""
        parts.append(f"<details{open_}><summary>{_e(method or 'probe')}</summary>{check_table(frame, method)}</details>")
    parts.append("</section>")

    parts.append('<section id="plans"><h2>Plans</h2>')
    for method, (columns, rows, plan_notes) in plans.items():
        parts.append(f"<details><summary>{_e(method)}</summary>{plan_table(columns, rows)}")
        parts += [f'<p class="note">note: {_e(n)}</p>' for n in plan_notes]
        parts.append("</details>")
    parts.append("</section>")
    parts.append(web.page_scripts() if interactive else web.sort_script_only())
    parts.append("</body></html>")
    return "\n".join(parts)
