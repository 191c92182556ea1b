"""The papers' tables and curves, from a results store.

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

import base64
import html
import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS = ("accuracy", "precision", "recall", "f1", "loss")
METRIC_LABELS = {"accuracy": "Acc.", "precision": "Pre.", "recall": "Rec.", "f1": "F1", "loss": "Loss"}
AXIS_LABELS = {"data": "dataset", "model": "model", "method": "method", "optimizer": "optimizer", "lr": "lr",
               "seed": "seed"}
COUNTED = ("finished", "diverged")
MAX_CURVE_FIGURES = 24


# -- loading ------------------------------------------------------------------------------------------


def load_runs(db: str | Path) -> pd.DataFrame:
    """Every run of a store, one row each: the ``runs`` columns, ``config`` parsed, each config key as a
    ``cfg_<key>`` column, and ``best_val`` (the run's best validation accuracy over its epochs)."""
    with _connect(db) as conn:
        runs = pd.read_sql_query("SELECT * FROM runs ORDER BY started_at, run_id", conn)
        best = pd.read_sql_query("SELECT run_id, MAX(val_accuracy) AS best_val, COUNT(*) AS n_epochs "
                                 "FROM epochs GROUP BY run_id", conn)
    runs = runs.merge(best, on="run_id", how="left")
    configs = [json.loads(c) for c in runs["config"]]
    runs["config"] = configs
    keys = list(dict.fromkeys(k for c in configs for k in c))
    for k in keys:
        runs[f"cfg_{k}"] = [_hashable(c.get(k)) for c in configs]
    return runs


def load_epochs(db: str | Path) -> pd.DataFrame:
    with _connect(db) as conn:
        return pd.read_sql_query("SELECT * FROM epochs ORDER BY run_id, epoch", conn)


def load_sweeps(db: str | Path) -> list[dict[str, Any]]:
    with _connect(db) as conn:
        try:
            rows = conn.execute("SELECT sweep_id, name, grid, run_ids, created_at FROM sweeps "
                                "ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:  # a store written before sweeps were recorded
            return []
    return [{"sweep_id": r[0], "name": r[1], "grid": json.loads(r[2]), "run_ids": json.loads(r[3]),
             "created_at": r[4]} for r in rows]


class _connect:
    """Read-only connection as a context manager (closes, unlike sqlite3's own)."""

    def __init__(self, db: str | Path) -> None:
        path = Path(db)
        if not path.is_file():
            raise FileNotFoundError(f"no results database at {path}")
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# -- the tables (pure: DataFrames in, DataFrames out) -------------------------------------------------------


def _order(values: Sequence[Any], key: str) -> list[Any]:
    """Methods in the papers' order; everything else in order of first appearance."""
    seen = list(dict.fromkeys(values))
    if key == "method":
        from initscope.methods import METHODS

        rank = {m: i for i, m in enumerate(METHODS)}
        return sorted(seen, key=lambda m: (rank.get(m, len(rank)), str(m)))
    if key == "lr":
        return sorted(seen)
    return seen


def varying_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys that take more than one value among these runs (``device`` never counts)."""
    keys = [c[4:] for c in runs.columns if c.startswith("cfg_") and c != "cfg_device"]
    return [k for k in keys if runs[f"cfg_{k}"].astype(str).nunique(dropna=False) > 1]


def _settings(runs: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    return [k for k in varying_keys(runs) if k not in axes and k != "seed"]


def _counted(runs: pd.DataFrame) -> pd.DataFrame:
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
    counted = _counted(runs)
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
    counted = _counted(runs)
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
        order = {v: i for i, v in enumerate(_order(list(runs[f"cfg_{k}"]), k))}
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


def markdown_table(corner: str, headers: list[str], grid: list[list[tuple[str, bool]]], labels: list[str]) -> str:
    """A Markdown table; bold cells as ``**text**``."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

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


# -- the report ---------------------------------------------------------------------------------------


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


@dataclass
class Report:
    """What :func:`write_report` made: the tables, the figures and the files written."""

    out_dir: Path
    tables: list[Table]
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png)
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def table(self, key: str) -> Table:
        for t in self.tables:
            if t.key == key:
                return t
        raise KeyError(f"no table {key!r}; have: {', '.join(t.key for t in self.tables)}")


def _seeds_note(table: pd.DataFrame) -> str:
    ns = sorted({int(n) for n in table["n"]}) if len(table) else [0]
    if len(ns) == 1:
        return f"mean ± std over {ns[0]} seed{'s' if ns[0] != 1 else ''}"
    return f"mean ± std over {ns[0]}-{ns[-1]} seeds per cell (n in the CSV)"


def build_tables(runs: pd.DataFrame) -> list[Table]:
    """The three tables of the report, from :func:`load_runs`' frame."""
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


def _curve_frames(runs: pd.DataFrame, epochs: pd.DataFrame) -> list[tuple[str, pd.DataFrame, int]]:
    """One history frame per group of runs that differ only in method and seed; ``label`` = method,
    values averaged over seeds epoch by epoch."""
    counted = _counted(runs)
    if counted.empty or epochs.empty:
        return []
    group_keys = [k for k in varying_keys(counted) if k not in ("method", "seed")]
    cols = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    out = []
    groups = counted.groupby([f"cfg_{k}" for k in group_keys], sort=False) if group_keys else [((), counted)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        hist = epochs[epochs["run_id"].isin(g["run_id"])].merge(g[["run_id", "cfg_method"]], on="run_id")
        if hist.empty:
            continue
        mean = hist.groupby(["cfg_method", "epoch"], sort=False)[cols].mean().reset_index()
        order = {m: i for i, m in enumerate(_order(list(mean["cfg_method"]), "method"))}
        mean = mean.sort_values(["cfg_method", "epoch"], key=lambda s: s.map(order) if s.name == "cfg_method" else s)
        mean = mean.rename(columns={"cfg_method": "label"})
        first = g.iloc[0]
        fixed = [f"{first['cfg_data']}", f"{first['cfg_model']}", f"{first['cfg_optimizer']}", f"lr {first['cfg_lr']:g}"]
        name = " · ".join(dict.fromkeys(fixed + [f"{k}={v}" for k, v in zip(group_keys, key)
                                                 if k not in ("data", "model", "optimizer", "lr")]))
        out.append((name, mean, int(g["cfg_seed"].nunique()) if "cfg_seed" in g else 1))
    return out[:MAX_CURVE_FIGURES]


def _probe_frames(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Probe tables saved beside runs (``<run_dir>/probe.parquet``), concatenated per group of runs that
    differ only in method, first seed only, earliest probe only (the initialization)."""
    counted = _counted(runs)
    if "run_dir" not in counted:
        return []
    frames: dict[str, list[pd.DataFrame]] = {}
    first_seed = counted["cfg_seed"].min() if "cfg_seed" in counted else None
    for r in counted.to_dict("records"):
        if r.get("run_dir") is None or (first_seed is not None and r["cfg_seed"] != first_seed):
            continue
        path = Path(r["run_dir"]) / "probe.parquet"
        if not path.is_file():
            continue
        f = pd.read_parquet(path)
        for col in ("epoch", "step"):  # several probes in one file: keep the first (at initialization)
            if col in f.columns:
                f = f[f[col] == f[col].min()]
        f = f.drop(columns=["method"], errors="ignore").assign(method=r["cfg_method"])
        key = f"{r['cfg_data']} · {r['cfg_model']}"
        frames.setdefault(key, []).append(f)
    return [(k, pd.concat(v, ignore_index=True)) for k, v in frames.items()]


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch == "-" else "_" for ch in text)
    return "_".join(filter(None, keep.split("_")))[:80]


def _what_was_run(db: Path, runs: pd.DataFrame, epochs: pd.DataFrame) -> dict[str, Any]:
    sweeps = load_sweeps(db)
    planned = {rid for s in sweeps for rid in s["run_ids"]}
    with _connect(db) as conn:
        present = {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    counts = runs["status"].value_counts().to_dict()
    failed = runs[runs["status"] == "failed"]
    errors = [(r["run_id"], (r["error"] or "").strip().splitlines()[-1:] or [""]) for r in failed.to_dict("records")]
    seconds = float(pd.to_numeric(epochs.get("seconds", pd.Series(dtype=float)), errors="coerce").sum())
    fixed_keys = [k[4:] for k in runs.columns if k.startswith("cfg_") and k[4:] not in varying_keys(runs)]
    fixed = {k: runs[f"cfg_{k}"].iloc[0] for k in fixed_keys} if len(runs) else {}
    return {
        "sweeps": sweeps,
        "counts": {s: int(counts.get(s, 0)) for s in ("finished", "diverged", "failed", "running")},
        "not_started": len(planned - present),
        "total": len(runs),
        "varying": {k: _order(list(runs[f"cfg_{k}"]), k) for k in varying_keys(runs)},
        "fixed": fixed,
        "failed": [(rid, line[0]) for rid, line in errors],
        "train_seconds": seconds,
    }


def _summary_markdown(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = []
    if s.get("where"):
        lines += ["Only the runs with " + "; ".join(f"{k} in {', '.join(v)}" for k, v in s["where"].items())
                  + " (the sweeps below list everything that was asked for).", ""]
    lines += [f"{s['total']} run{'s' if s['total'] != 1 else ''} in the database: {c['finished']} finished, {c['diverged']} diverged, "
             f"{c['failed']} failed, {c['running']} running or interrupted"
             + (f"; {s['not_started']} of the sweeps' runs not started yet" if s["not_started"] else "")
             + f". Training time, summed over runs: {s['train_seconds'] / 60:.1f} min.", ""]
    for sw in s["sweeps"]:
        n = len(sw["run_ids"])
        lines.append(f"- sweep `{sw['name'] or sw['sweep_id']}` ({n} runs, first started {sw['created_at']}):")
        for k, v in sw["grid"].get("grid", {}).items():
            if isinstance(v, dict):  # learning rates per optimizer
                lines.append(f"  - {k}: " + "; ".join(f"{o}: {', '.join(map(str, lr))}" for o, lr in v.items()))
            else:
                lines.append(f"  - {k}: {', '.join(map(str, v))}")
        fixed = sw["grid"].get("run", {})
        if fixed:
            lines.append("  - fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    if not s["sweeps"]:
        for k, v in s["varying"].items():
            lines.append(f"- {k}: {', '.join(map(str, v))}")
    if s["fixed"]:
        lines.append("")
        lines.append("Same in every run: " + ", ".join(f"{k}={v}" for k, v in s["fixed"].items()) + ".")
    if s["failed"]:
        lines.append("")
        lines.append("Failed runs (last line of the error):")
        lines.extend(f"- `{rid}`: {msg}" for rid, msg in s["failed"])
    return "\n".join(lines)


def _md_to_html_list(text: str) -> str:
    """The summary's few Markdown forms (paragraphs, two-level bullets, `code`) as HTML."""
    out, depth = [], 0
    for line in text.splitlines():
        stripped = line.lstrip()
        level = (len(line) - len(stripped)) // 2 + 1 if stripped.startswith("- ") else 0
        while depth < level:
            out.append("<ul>")
            depth += 1
        while depth > level:
            out.append("</ul>")
            depth -= 1
        body = html.escape(stripped[2:] if level else stripped)
        parts = body.split("`")
        body = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        if level:
            out.append(f"<li>{body}</li>")
        elif body:
            out.append(f"<p>{body}</p>")
    out.extend("</ul>" for _ in range(depth))
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f4f4f4}tbody th{text-align:left}caption{caption-side:bottom;font-size:12px;
color:#555;text-align:left;padding-top:4px}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}"""


def select_runs(runs: pd.DataFrame, where: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    """The runs whose config matches ``where`` (key -> accepted values, compared as text)."""
    keys = [c[4:] for c in runs.columns if c.startswith("cfg_")]
    for key, values in where.items():
        if key not in keys:
            raise ValueError(f"where: unknown key {key!r}; valid: {', '.join(keys)}")
        accepted = {str(v) for v in values}
        col = runs[f"cfg_{key}"]
        # 1e-3 and 0.001 are one learning rate: compare numbers as numbers where both sides are
        nums = pd.to_numeric(col, errors="coerce")
        num_accepted = {float(v) for v in accepted if _is_number(v)}
        runs = runs[col.astype(str).isin(accepted) | nums.isin(num_accepted)]
    return runs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_report(db: str | Path, out_dir: str | Path, *, title: str | None = None,
                 figures: bool = True, where: Mapping[str, Sequence[Any]] | None = None) -> Report:
    """Render the tables (Markdown, HTML, CSV) and the curves of a results database into ``out_dir``.

    Writes ``report.md``, ``report.html`` (self-contained: figures embedded as base64 PNG), one CSV per
    table (long form, with ``std``, ``n`` and the chosen ``setting``), ``runs.csv`` (every run) and the
    figures as PNG and SVG under ``figures/``. ``where`` keeps only the runs whose config matches
    (``{"optimizer": ["adam"]}``), for a table restricted as a paper's was.
    """
    db, out_dir = Path(db), Path(out_dir)
    runs = load_runs(db)
    if where:
        runs = select_runs(runs, where)
    epochs = load_epochs(db)
    epochs = epochs[epochs["run_id"].isin(runs["run_id"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs) if len(runs) else []
    report = Report(out_dir, tables)
    report.summary = _what_was_run(db, runs, epochs) if len(runs) else {
        "sweeps": load_sweeps(db), "counts": dict.fromkeys(("finished", "diverged", "failed", "running"), 0),
        "not_started": 0, "total": 0, "varying": {}, "fixed": {}, "failed": [], "train_seconds": 0.0}
    report.summary["where"] = {k: [str(v) for v in vs] for k, vs in (where or {}).items()}

    for t in tables:
        path = out_dir / f"{t.key}.csv"
        t.data.to_csv(path, index=False)
        report.files.append(path)
    runs_csv = out_dir / "runs.csv"
    flat = runs.drop(columns=["config"]).rename(columns=lambda c: c[4:] if c.startswith("cfg_") else c)
    flat = flat.loc[:, ~flat.columns.duplicated()]
    flat.to_csv(runs_csv, index=False)
    report.files.append(runs_csv)

    if figures:
        from initscope.plotting.curves import plot_training_curves

        fig_dir = out_dir / "figures"
        for name, frame, n in _curve_frames(runs, epochs):
            png = fig_dir / f"curves_{_slug(name)}.png"
            plot_training_curves(frame, path=png, title=f"{name} (mean over {n} seed{'s' if n != 1 else ''})")
            report.figures.append((f"Training curves: {name}; training dashed, validation solid.", png))
        report.figures.extend(_write_probe_figures(runs, fig_dir))
        report.files.extend(p for _, p in report.figures)

    heading = title or f"initscope results: {db.name}"
    md = _render_markdown(report, heading)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(_render_html(report, heading))
    report.files[:0] = [out_dir / "report.md", out_dir / "report.html"]
    return report


def _write_probe_figures(runs: pd.DataFrame, fig_dir: Path) -> list[tuple[str, Path]]:
    probes = _probe_frames(runs)
    if not probes:
        return []
    from initscope import plotting

    made = []
    plots = [("depth", "variance against depth, measured (solid) and predicted (dashed)",
              getattr(plotting, "plot_depth", None), {}),
             ("activation", "activation histograms at initialization",
              getattr(plotting, "plot_histograms", None), {"quantity": "activation"}),
             ("gradient", "gradient histograms at initialization",
              getattr(plotting, "plot_histograms", None), {"quantity": "output_grad"})]
    for name, frame in probes:
        for kind, caption, fn, kw in plots:
            if fn is None:
                continue
            png = fig_dir / f"probe_{kind}_{_slug(name)}.png"
            try:
                fn(frame, path=png, title=f"{name}: {caption}", **kw)
            except ValueError as exc:  # e.g. the probe ran without histograms
                made.append((f"(no {kind} figure for {name}: {exc})", None))
                continue
            made.append((f"Probe, {name}: {caption}.", png))
    return [(c, p) for c, p in made if p is not None]


_NO_RUNS = "No finished or diverged runs yet."


def _render_markdown(report: Report, heading: str) -> str:
    parts = [f"# {heading}", "", "## What was run", "", _summary_markdown(report.summary), ""]
    for t in report.tables:
        if t.data.empty:
            parts += [f"## {t.title}", "", _NO_RUNS, ""]
            continue
        parts += [f"## {t.title}", "", t.markdown(), "", f"*{t.caption}* CSV: `{t.key}.csv`.", ""]
    if report.figures:
        parts += ["## Figures", ""]
        for caption, png in report.figures:
            rel = png.relative_to(report.out_dir).as_posix()
            parts += [f"![{caption}]({rel})", "", caption, ""]
    return "\n".join(parts)


def _render_html(report: Report, heading: str) -> str:
    body = [f"<h1>{html.escape(heading)}</h1>", "<h2>What was run</h2>", _md_to_html_list(_summary_markdown(report.summary))]
    for t in report.tables:
        if t.data.empty:
            body += [f"<h2>{html.escape(t.title)}</h2>", f"<p>{_NO_RUNS}</p>"]
            continue
        table = t.html().replace("<table>", f"<table><caption>{html.escape(t.caption)}</caption>", 1)
        body += [f"<h2>{html.escape(t.title)}</h2>", table]
    if report.figures:
        body.append("<h2>Figures</h2>")
        for caption, png in report.figures:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")
