"""The papers' tables from a frame of runs: pure functions, DataFrames in, DataFrames (and display grids) out.

Three tables, each cell the mean ± sample standard deviation over seeds:

- **Table 1 of the ASV poster**: best validation accuracy (%) by dataset × method;
- **Table 3 of the ASV poster**: best validation accuracy (%) by optimizer × method;
- **Table 1 of the Glorot/He paper**: test accuracy, precision, recall, F1 and loss by model × method,
  measured with the checkpoint of best validation accuracy.

A run's *best validation accuracy* is ``max_e val_accuracy(e)`` over its epochs. When the database
varies more than the table's two axes and the seed (several learning rates, say), each cell shows the
setting of the other axes with the highest mean best validation accuracy — selection on validation,
never on test — and the CSV names it. Finished and diverged runs count; a diverged run contributes the
best validation accuracy it reached before diverging (none when it diverged in its first epoch), and the
cell says how many of its runs diverged. Failed and running runs are left out and listed.

Best in bold: per row in the poster's tables (the best method for a dataset or an optimizer), per
column in the second paper's (the best model and method for a metric; the lowest loss).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from initscope.experiments.tables.frames import varying_keys

METRICS = ("accuracy", "precision", "recall", "f1", "loss")
METRIC_LABELS = {"accuracy": "Acc.", "precision": "Pre.", "recall": "Rec.", "f1": "F1", "loss": "Loss"}
AXIS_LABELS = {"data": "dataset", "model": "model", "method": "method", "optimizer": "optimizer", "lr": "lr",
               "seed": "seed"}
COUNTED = ("finished", "diverged")


# -- the tables (pure: DataFrames in, DataFrames out) -------------------------------------------------------


def in_order(values: Sequence[Any], key: str) -> list[Any]:
    """Methods in the papers' order; everything else in order of first appearance."""
    seen = list(dict.fromkeys(values))
    if key == "method":
        from initscope.methods import METHODS

        rank = {m: i for i, m in enumerate(METHODS)}
        return sorted(seen, key=lambda m: (rank.get(m, len(rank)), str(m)))
    if key == "lr":
        return sorted(seen)
    return seen


def _settings(runs: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    return [k for k in varying_keys(runs) if k not in axes and k != "seed"]


def counted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].isin(COUNTED)]


def _mean_std(x: pd.Series) -> tuple[float, float, int]:
    v = pd.to_numeric(x, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _best_settings(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """For each cell of ``axes``, the runs of the setting (of the other varying keys) with the highest
    mean best validation accuracy; a ``setting`` column says which."""
    other = _settings(runs, axes)
    picked = []
    for cell, group in runs.groupby([f"cfg_{a}" for a in axes], sort=False, dropna=False):
        if not other:
            picked.append(group.assign(setting=""))
            continue
        best_key, best_score = None, -math.inf
        for key, sub in group.groupby([f"cfg_{k}" for k in other], sort=False, dropna=False):
            score = pd.to_numeric(sub["best_val"], errors="coerce").mean()
            score = -math.inf if pd.isna(score) else float(score)
            if best_key is None or score > best_score:
                best_key, best_score = key, score
        key_tuple = best_key if isinstance(best_key, tuple) else (best_key,)
        mask = np.ones(len(group), dtype=bool)
        for k, v in zip(other, key_tuple):
            mask &= (group[f"cfg_{k}"].astype(str) == str(v)).to_numpy()
        label = ", ".join(f"{k}={v}" for k, v in zip(other, key_tuple))
        picked.append(group[mask].assign(setting=label))
    return pd.concat(picked) if picked else runs.assign(setting="")


def accuracy_table(runs: pd.DataFrame, rows: str, cols: str = "method") -> pd.DataFrame:
    """Best validation accuracy in %, long form: one line per (row, col) cell.

    Columns: ``<rows>``, ``<cols>``, ``mean``, ``std`` (sample, over seeds; NaN for one seed), ``n``
    (runs with a value), ``n_diverged``, ``setting`` (the other keys' chosen values), ``best`` (the
    highest mean in its row).
    """
    counted = counted_runs(runs)
    if counted.empty:
        return pd.DataFrame(columns=[rows, cols, "mean", "std", "n", "n_diverged", "setting", "best"])
    chosen = _best_settings(counted, (rows, cols))
    lines = []
    for (r, c), g in chosen.groupby([f"cfg_{rows}", f"cfg_{cols}"], sort=False, dropna=False):
        mean, std, n = _mean_std(g["best_val"] * 100.0)
        lines.append({rows: r, cols: c, "mean": mean, "std": std, "n": n,
                      "n_diverged": int((g["status"] == "diverged").sum()), "setting": g["setting"].iloc[0]})
    table = pd.DataFrame(lines)
    table = _sort(table, [rows, cols], counted)
    best = table.groupby(rows, sort=False)["mean"].transform("max")
    table["best"] = table["mean"].notna() & (table["mean"] == best)
    return table.reset_index(drop=True)


def test_metrics_table(runs: pd.DataFrame, rows: Sequence[str] = ("model", "method")) -> pd.DataFrame:
    """Test accuracy, precision, recall, F1 and loss by ``rows``, long-wide: one line per row key with
    ``<metric>_mean``, ``<metric>_std``, ``<metric>_best`` for each metric, plus ``n``, ``n_diverged``,
    ``setting``. Bold goes to the highest mean per column, the lowest for loss."""
    rows = list(rows)
    counted = counted_runs(runs)
    columns = rows + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "best")] + ["n", "n_diverged", "setting"]
    if counted.empty:
        return pd.DataFrame(columns=columns)
    chosen = _best_settings(counted, rows)
    lines = []
    for key, g in chosen.groupby([f"cfg_{r}" for r in rows], sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        line: dict[str, Any] = dict(zip(rows, key))
        for m in METRICS:
            line[f"{m}_mean"], line[f"{m}_std"], _ = _mean_std(g[f"test_{m}"])
        line["n"] = int(pd.to_numeric(g["test_accuracy"], errors="coerce").notna().sum())
        line["n_diverged"] = int((g["status"] == "diverged").sum())
        line["setting"] = g["setting"].iloc[0]
        lines.append(line)
    table = _sort(pd.DataFrame(lines), rows, counted)
    for m in METRICS:
        col = table[f"{m}_mean"]
        target = col.min() if m == "loss" else col.max()
        table[f"{m}_best"] = col.notna() & (col == target)
    return table[columns].reset_index(drop=True)


def _sort(table: pd.DataFrame, keys: Sequence[str], runs: pd.DataFrame) -> pd.DataFrame:
    for k in reversed(list(keys)):
        order = {v: i for i, v in enumerate(in_order(list(runs[f"cfg_{k}"]), k))}
        table = table.sort_values(k, key=lambda s: s.map(order), kind="stable")
    return table


# -- rendering ----------------------------------------------------------------------------------------


def _cell(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.{digits}f}"
    return text


def _accuracy_grid(table: pd.DataFrame, rows: str, cols: str) -> tuple[list[str], list[list[tuple[str, bool]]], list[str]]:
    """(column headers, rows of (text, bold) cells, row labels) for a long accuracy table."""
    col_values = list(dict.fromkeys(table[cols]))
    row_values = list(dict.fromkeys(table[rows]))
    by = {(r[rows], r[cols]): r for r in table.to_dict("records")}
    grid = []
    for rv in row_values:
        cells = []
        for cv in col_values:
            r = by.get((rv, cv))
            if r is None:
                cells.append(("", False))
                continue
            text = _cell(r["mean"], r["std"], 2)
            if r["n_diverged"]:
                text += f" ({r['n_diverged']} div.)"
            cells.append((text, bool(r["best"])))
        grid.append(cells)
    return [str(c) for c in col_values], grid, [str(r) for r in row_values]


def _metrics_grid(table: pd.DataFrame, rows: Sequence[str]) -> tuple[list[str], list[list[tuple[str, bool]]], list[str]]:
    headers = [METRIC_LABELS[m] for m in METRICS]
    grid, labels = [], []
    for r in table.to_dict("records"):
        labels.append(", ".join(str(r[k]) for k in rows))
        cells = [(_cell(r[f"{m}_mean"], r[f"{m}_std"], 4), bool(r[f"{m}_best"])) for m in METRICS]
        if r["n_diverged"]:
            cells[-1] = (cells[-1][0] + f" ({r['n_diverged']} div.)", cells[-1][1])
        grid.append(cells)
    return headers, grid, labels


# Characters that make Markdown out of text: emphasis, code, links and images, tables, escapes; '<' and '&'
# become entities so that no raw HTML (a <script> in a sweep name or a folder path) reaches a renderer.
_MD_SPECIAL = {c: "\\" + c for c in "\\`*_[]|#"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def md_text(text: object) -> str:
    """``text`` as literal Markdown: every character that Markdown or HTML would read is escaped, line
    breaks become spaces (a value must not start a block of its own).

    Examples:
        >>> md_text("<script>x</script> [a](b)")
        '&lt;script&gt;x&lt;/script&gt; \\\\[a\\\\](b)'
    """
    return "".join(_MD_SPECIAL.get(c, c) for c in " ".join(str(text).splitlines()))


def md_code(text: object) -> str:
    """``text`` as a Markdown code span, or as escaped text (:func:`md_text`) where it holds ``<``, ``>``,
    ``&`` or a backtick: CommonMark shows a code span's content literally, but the file would still hold
    the raw characters for any tool that reads it as HTML, and a backtick would end the span."""
    text = " ".join(str(text).splitlines())
    if any(c in text for c in "<>&`") or not text.strip():
        return md_text(text)
    return f"`{text}`"


def markdown_table(corner: str, headers: list[str], grid: list[list[tuple[str, bool]]], labels: list[str]) -> str:
    """A Markdown table; bold cells as ``**text**``; every label and cell escaped (:func:`md_text`)."""
    esc = md_text

    lines = ["| " + " | ".join([esc(corner)] + [esc(h) for h in headers]) + " |",
             "|" + "---|" * (len(headers) + 1)]
    for label, cells in zip(labels, grid):
        texts = [f"**{esc(t)}**" if bold and t else esc(t) for t, bold in cells]
        lines.append("| " + " | ".join([esc(label)] + texts) + " |")
    return "\n".join(lines)


def html_table(corner: str, headers: list[str], grid: list[list[tuple[str, bool]]], labels: list[str]) -> str:
    """An HTML table; bold cells in ``<b>``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [corner] + headers)
    body = []
    for label, cells in zip(labels, grid):
        tds = "".join(f"<td><b>{html.escape(t)}</b></td>" if bold and t else f"<td>{html.escape(t)}</td>"
                      for t, bold in cells)
        body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- the tables as values ---------------------------------------------------------------------------------------


@dataclass
class Table:
    """One rendered table: its long-form numbers and its display grid."""

    key: str
    title: str
    caption: str
    data: pd.DataFrame
    corner: str
    headers: list[str]
    grid: list[list[tuple[str, bool]]]
    labels: list[str]

    def markdown(self) -> str:
        return markdown_table(self.corner, self.headers, self.grid, self.labels)

    def html(self) -> str:
        return html_table(self.corner, self.headers, self.grid, self.labels)


def _seeds_note(table: pd.DataFrame) -> str:
    ns = sorted({int(n) for n in table["n"]}) if len(table) else [0]
    if len(ns) == 1:
        return f"mean ± std over {ns[0]} seed{'s' if ns[0] != 1 else ''}"
    return f"mean ± std over {ns[0]}-{ns[-1]} seeds per cell (n in the CSV)"


def build_tables(runs: pd.DataFrame) -> list[Table]:
    """The three tables of the report, from :func:`~initscope.experiments.tables.frames.load_runs`' frame."""
    tables = []
    for key, rows, title in (("table1_dataset_method", "data",
                              "Table 1 (ASV poster): best validation accuracy (%) by dataset × method"),
                             ("table3_optimizer_method", "optimizer",
                              "Table 3 (ASV poster): best validation accuracy (%) by optimizer × method")):
        t = accuracy_table(runs, rows, "method")
        headers, grid, labels = _accuracy_grid(t, rows, "method")
        other = sorted(set(t["setting"])) if len(t) else []
        caption = f"{_seeds_note(t)}; best per row in bold."
        if any(other):
            caption += " Each cell: the setting of the other varied keys with the best mean (see CSV: setting)."
        tables.append(Table(key, title, caption, t, AXIS_LABELS[rows], headers, grid, labels))
    t = test_metrics_table(runs, ("model", "method"))
    headers, grid, labels = _metrics_grid(t, ("model", "method"))
    tables.append(Table("table_model_method_test", "Table 1 (Glorot/He paper): test metrics by model × method",
                        f"checkpoint of best validation accuracy; macro precision, recall, F1; {_seeds_note(t)}; "
                        "best per column in bold (lowest loss).", t, "model, method", headers, grid, labels))
    return tables
