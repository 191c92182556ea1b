r"""The papers' tables from a frame of runs: pure functions, DataFrames in, DataFrames (and display grids) out.

Every cell is a mean over seeds with what a reader needs to judge it: the sample standard deviation,
``n`` (the runs it averages) and a 95 % confidence interval of the mean, the **t interval**
:math:`\bar x \pm t_{0.975,\,n-1}\, s / \sqrt{n}` (for ``n`` >= 2; a cell of one run has none, and says
``n=1``). Within each comparison (a row of methods; a column of the Glorot/He table, within one model) a
winner is **bold** only when its interval overlaps no other cell's interval; otherwise the best cell and
every cell that cannot be told apart from it (overlapping intervals, or no interval) are marked ``≈``
(tied). The CSVs carry ``mean``, ``std``, ``n``, ``ci_low``, ``ci_high`` and ``mark`` (best, tie or empty).

The tables:

- **test accuracy by setting × method** (the form of the ASV poster's Tables 1-3): test accuracy (%) of
  the checkpoint with the best validation accuracy, one row per setting (every varied key but the method,
  the seed and the tuned keys: ``data``, ``model``, ``optimizer``, ...), a column per method. Keyed
  ``table1_dataset_method`` when only the dataset makes the rows, ``table3_optimizer_method`` when only
  the optimizer does;
- **Table 1 of the Glorot/He paper**: test accuracy, precision, recall, F1 (all four in %) and loss by
  (setting,) model × method, with the best-validation checkpoint;
- **test accuracy after epoch k** (runs with ``test_at``): the weights of that epoch, not the best ones;
- **the selection** (sweeps with ``[select]``): each group's candidate values with their score, the choice,
  and whether the choice lies at an edge of the grid, beating its neighbour (the best value may lie beyond).

A table never mixes settings: keys that vary and are not tuned make rows (or columns), never a choice.
The tuned keys are the learning rate and the axis of a ``[select]``: where a cell holds several values of
one, the value with the best mean *validation* accuracy is taken (never test), and where one varies
across the table each cell names the value it took. A ``[select]`` choice recorded in the store is the
cell's value; the group's runs at the other values are selection runs only, left out of the tables and
shown in the selection table. A group chosen again among more values (a later sweep with a wider grid)
takes its latest choice: the runs at an earlier choice that the latest one moved from become selection
runs.

Finished and diverged runs count; a diverged run contributes the best validation accuracy it reached
before diverging (none when it diverged in its first epoch), and its test accuracy at that checkpoint;
the cell says how many of its runs diverged. Failed and running runs are left out and listed.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from initscope.experiments.config.select import grid_edge
from initscope.experiments.tables.frames import is_number, varying_keys

METRICS = ("accuracy", "precision", "recall", "f1", "loss")
METRIC_LABELS = {"accuracy": "Acc. (%)", "precision": "Pre. (%)", "recall": "Rec. (%)", "f1": "F1 (%)", "loss": "Loss"}
# The report's one convention: accuracy (and precision, recall, F1) in percent, in every table and figure;
# the store keeps fractions, as the runs record them.
PERCENT_METRICS = ("accuracy", "precision", "recall", "f1")
AXIS_LABELS = {"data": "dataset", "model": "model", "method": "method", "optimizer": "optimizer", "lr": "lr",
               "seed": "seed"}
COUNTED = ("finished", "diverged")
CONFIDENCE = 0.95
TIE = "≈"
EDGE_MARK = "⇥"  # a [select] choice at the grid's edge that beat its neighbour
Grid = tuple[list[str], list[list[tuple[str, bool]]], list[str]]  # headers, rows of (text, bold) cells, row labels


# -- statistics ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """A cell's numbers: mean, sample standard deviation, n, and the 95 % t interval of the mean (NaN for n < 2)."""

    mean: float
    std: float
    n: int
    low: float
    high: float

    @staticmethod
    def of(values: Iterable[Any]) -> "Stat":
        """The statistics of ``values`` (NaN and None left out)."""
        v = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().to_numpy(dtype=float)
        n = len(v)
        if n == 0:
            return Stat(math.nan, math.nan, 0, math.nan, math.nan)
        mean = float(v.mean())
        if n == 1:
            return Stat(mean, math.nan, 1, math.nan, math.nan)
        from scipy import stats

        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        return Stat(mean, sd, n, mean - half, mean + half)

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low)

    def overlaps(self, other: "Stat") -> bool:
        """Whether the two intervals share a point; a cell without an interval overlaps everything."""
        if not (self.has_interval and other.has_interval):
            return True
        return self.low <= other.high and other.low <= self.high


def marks(stats: Mapping[Any, Stat], higher_is_better: bool = True) -> dict[Any, str]:
    """``best`` for a winner whose interval overlaps no other cell's, else ``tie`` for the best cell and every
    cell it cannot be told apart from; ``""`` for the rest, for cells without a value, and everywhere when fewer
    than two cells have one (nothing to compare)."""
    have = {k: s for k, s in stats.items() if s.n > 0 and math.isfinite(s.mean)}
    out = {k: "" for k in stats}
    if len(have) < 2:
        return out
    sign = 1 if higher_is_better else -1
    top = max(have, key=lambda k: sign * have[k].mean)
    rivals = [k for k in have if k != top and have[k].overlaps(have[top])]
    if not rivals:
        out[top] = "best"
    else:
        for k in [top, *rivals]:
            out[k] = "tie"
    return out


# -- which runs count, and which setting a cell takes ------------------------------------------------------


def in_order(values: Sequence[Any], key: str) -> list[Any]:
    """Methods in the papers' order; learning rates ascending; everything else in order of first appearance."""
    seen = list(dict.fromkeys(values))
    if key == "method":
        from initscope.methods import METHODS

        rank = {m: i for i, m in enumerate(METHODS)}
        base = lambda m: str(m).split(" (")[0]  # noqa: E731 - a variant ("asv-backward (residual=zero)") by its method
        return sorted(seen, key=lambda m: (rank.get(base(m), len(rank)), str(m)))
    if key == "lr":
        return sorted(seen)
    return seen


def counted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].isin(COUNTED)]


def tuned_keys(selections: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The keys a cell may choose on validation: the learning rate and every ``[select]`` axis."""
    return list(dict.fromkeys(["lr", *(s["axis"] for s in selections or ())]))


def current_selections(selections: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """The latest choice of each ``[select]`` group (``selections`` in the order they were decided): a group
    chosen again among a wider grid keeps only its newer choice."""
    latest = {_group_key(sel): sel for sel in selections or ()}  # a later choice of a group replaces the earlier
    return list(latest.values())


def _group_key(selection: Mapping[str, Any]) -> tuple[str, str]:
    return selection["axis"], json.dumps(selection["group"], sort_keys=True)


def apply_selections(runs: pd.DataFrame, selections: Sequence[Mapping[str, Any]] | None) -> pd.DataFrame:
    """``runs`` with a column ``selection``: ``chosen`` for a run of a ``[select]`` group at its chosen value,
    ``candidate`` for the group's runs at the other values (selection runs only), ``""`` for the rest. Where a
    group was chosen more than once (a wider grid later), a value takes the label of the latest choice
    among whose candidates it is (``selections`` are in the order they were decided)."""
    runs = runs.copy()
    runs["selection"] = ""
    if not selections or runs.empty:
        return runs
    from initscope.experiments.config import RunConfig
    from initscope.experiments.config.select import Select

    by_group: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sel in selections:
        by_group.setdefault(_group_key(sel), []).append(sel)
    labels = []
    for cfg in runs["config"]:
        label = ""
        try:
            config = RunConfig.from_dict(dict(cfg))
        except Exception:  # noqa: BLE001 - a config this release cannot read belongs to no group
            labels.append(label)
            continue
        for axis in dict.fromkeys(a for a, _ in by_group):
            group = json.dumps(Select(axis, (0,)).group(config), sort_keys=True)
            value = getattr(config, axis)
            for sel in by_group.get((axis, group), ()):
                values = [c["value"] for c in sel["scores"]]
                if value in values:
                    label = "chosen" if value == sel["chosen"] else "candidate"
        labels.append(label)
    runs["selection"] = labels
    return runs


def setting_keys(runs: pd.DataFrame, exclude: Iterable[str]) -> list[str]:
    """The keys that vary among ``runs`` and are settings (make rows), in the report's order."""
    exclude = set(exclude) | {"seed", "workers", "device"}
    first = ["data", "model", "norm", "head", "width", "optimizer", "image_size", "augment", "epochs"]
    keys = [k for k in varying_keys(runs) if k not in exclude]
    return sorted(keys, key=lambda k: (first.index(k) if k in first else len(first), keys.index(k)))


# Plan options that make a variant of a method: where they vary, they are part of the method's name in the tables.
METHOD_OPTIONS = ("residual", "distribution")


def method_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with each plan option that varies (``residual``, ``distribution``) folded into the method's name
    (``asv-backward (residual=zero)``): a variant of an initialization is a column of its own, not a setting."""
    runs = runs.copy()
    for key in METHOD_OPTIONS:
        col = f"cfg_{key}"
        if col not in runs or runs[col].astype(str).nunique(dropna=False) < 2:
            continue
        runs["cfg_method"] = [m if v is None or (isinstance(v, float) and math.isnan(v)) else f"{m} ({key}={v})"
                              for m, v in zip(runs["cfg_method"], runs[col])]
        runs[col] = "(in the method)"
    return runs


def _table_runs(runs: pd.DataFrame, selections: Sequence[Mapping[str, Any]] | None) -> pd.DataFrame:
    """The runs the tables count: finished or diverged, not selection runs only; method variants named."""
    counted = apply_selections(counted_runs(runs), selections)
    return method_variants(counted[counted["selection"] != "candidate"])


def _pick_tuned(runs: pd.DataFrame, cell_keys: Sequence[str], tuned: Sequence[str]) -> pd.DataFrame:
    """Per cell of ``cell_keys``: where a tuned key holds several values, the runs of the value(s) with the
    highest mean best validation accuracy; a ``setting`` column names the tuned values a cell took where
    they vary across the table."""
    tuned = [k for k in tuned if f"cfg_{k}" in runs and k not in cell_keys]
    shown = [k for k in tuned if runs[f"cfg_{k}"].astype(str).nunique(dropna=False) > 1]
    picked = []
    for _, group in runs.groupby([f"cfg_{a}" for a in cell_keys], sort=False, dropna=False):
        inner = [k for k in tuned if group[f"cfg_{k}"].astype(str).nunique(dropna=False) > 1]
        if inner:
            best_key, best_score = None, -math.inf
            for key, sub in group.groupby([f"cfg_{k}" for k in inner], sort=False, dropna=False):
                score = pd.to_numeric(sub["best_val"], errors="coerce").mean()
                score = -math.inf if pd.isna(score) else float(score)
                if best_key is None or score > best_score:
                    best_key, best_score = key, score
            key_tuple = best_key if isinstance(best_key, tuple) else (best_key,)
            mask = np.ones(len(group), dtype=bool)
            for k, v in zip(inner, key_tuple):
                mask &= (group[f"cfg_{k}"].astype(str) == str(v)).to_numpy()
            group = group[mask]
        label = ", ".join(f"{k}={_value_text(group[f'cfg_{k}'].iloc[0])}" for k in shown)
        picked.append(group.assign(setting=label))
    return pd.concat(picked) if picked else runs.assign(setting="")


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _sort(table: pd.DataFrame, keys: Sequence[str], runs: pd.DataFrame) -> pd.DataFrame:
    for k in reversed(list(keys)):
        order = {v: i for i, v in enumerate(in_order(list(runs[f"cfg_{k}"]), k))}
        table = table.sort_values(k, key=lambda s: s.map(order), kind="stable")
    return table


def _stat_columns(prefix: str, st: Stat) -> dict[str, Any]:
    return {f"{prefix}mean": st.mean, f"{prefix}std": st.std, f"{prefix}ci_low": st.low, f"{prefix}ci_high": st.high}


# -- the tables (pure: DataFrames in, DataFrames out) -------------------------------------------------------


def accuracy_table(runs: pd.DataFrame, rows: str | Sequence[str] | None = None, cols: str = "method", *,
                   selections: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Test accuracy in % at the best-validation checkpoint, long form: one line per (row, col) cell.

    ``rows``: the keys that make the rows (default: every varying setting key, see :func:`setting_keys`;
    ``data`` when none varies). Columns: the row keys, ``<cols>``, ``mean``, ``std``, ``ci_low``,
    ``ci_high`` (the 95 % t interval; NaN for one run), ``n`` (runs with a test accuracy),
    ``n_diverged``, ``val_mean`` (the mean best validation accuracy, %), ``setting`` (the tuned values
    taken), ``mark`` (best, tie or empty, within the row) and ``best`` (a winner outside every interval).
    """
    tuned = tuned_keys(selections)
    counted = _table_runs(runs, selections)
    row_keys = _row_keys(counted, rows, [cols], tuned)
    columns = [*row_keys, cols, "mean", "std", "ci_low", "ci_high", "n", "n_diverged", "val_mean", "setting", "mark",
               "best"]
    if counted.empty:
        return pd.DataFrame(columns=columns)
    chosen = _pick_tuned(counted, [*row_keys, cols], tuned)
    lines = []
    for key, g in chosen.groupby([f"cfg_{k}" for k in [*row_keys, cols]], sort=False, dropna=False):
        st = Stat.of(pd.to_numeric(g["test_accuracy"], errors="coerce") * 100.0)
        lines.append({**dict(zip([*row_keys, cols], key)), **_stat_columns("", st), "n": st.n,
                      "n_diverged": int((g["status"] == "diverged").sum()),
                      "val_mean": float(pd.to_numeric(g["best_val"], errors="coerce").mean() * 100.0),
                      "setting": g["setting"].iloc[0], "_stat": st})
    table = _sort(pd.DataFrame(lines), [*row_keys, cols], counted)
    table["mark"] = ""
    for _, g in table.groupby(row_keys, sort=False, dropna=False):
        for idx, mark in marks(dict(zip(g.index, g["_stat"]))).items():
            table.loc[idx, "mark"] = mark
    table["best"] = table["mark"] == "best"
    return table[columns].reset_index(drop=True)


def _row_keys(runs: pd.DataFrame, rows: str | Sequence[str] | None, cols: Sequence[str],
              tuned: Sequence[str]) -> list[str]:
    given = [] if rows is None else [rows] if isinstance(rows, str) else list(rows)
    others = setting_keys(runs, [*given, *cols, *tuned]) if len(runs) else []  # never mixed into one cell
    return given + others or ["data"]


def test_metrics_table(runs: pd.DataFrame, rows: Sequence[str] = ("model", "method"), *,
                       selections: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Test accuracy, precision, recall, F1 and loss by ``rows`` (and, in front, any other setting key that
    varies), long-wide: one line per row with ``<metric>_mean``, ``_std``, ``_ci_low``, ``_ci_high``, ``_mark``,
    ``_best`` for each metric, plus ``n``, ``n_diverged``, ``setting``. Accuracy, precision, recall and F1 are in
    %, as every table's accuracy is; the loss as the runs recorded it. Each metric's column is compared within
    rows that differ only in the method: the highest mean wins, the lowest for loss."""
    tuned = tuned_keys(selections)
    counted = _table_runs(runs, selections)
    rows = [k for k in setting_keys(counted, [*rows, *tuned]) if len(counted)] + list(rows)
    per_metric = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci_low", "ci_high", "mark", "best")]
    columns = rows + per_metric + ["n", "n_diverged", "setting"]
    if counted.empty:
        return pd.DataFrame(columns=columns)
    chosen = _pick_tuned(counted, rows, tuned)
    lines = []
    for key, g in chosen.groupby([f"cfg_{r}" for r in rows], sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        line: dict[str, Any] = dict(zip(rows, key))
        for m in METRICS:
            scale = 100.0 if m in PERCENT_METRICS else 1.0
            st = Stat.of(pd.to_numeric(g[f"test_{m}"], errors="coerce") * scale)
            line.update(_stat_columns(f"{m}_", st))
            line[f"_{m}"] = st
        line["n"] = int(pd.to_numeric(g["test_accuracy"], errors="coerce").notna().sum())
        line["n_diverged"] = int((g["status"] == "diverged").sum())
        line["setting"] = g["setting"].iloc[0]
        lines.append(line)
    table = _sort(pd.DataFrame(lines), rows, counted)
    within = [r for r in rows if r != "method"]
    groups = table.groupby(within, sort=False, dropna=False) if within else [((), table)]
    for m in METRICS:
        table[f"{m}_mark"] = ""
        for _, g in groups:
            for idx, mark in marks(dict(zip(g.index, g[f"_{m}"])), higher_is_better=m != "loss").items():
                table.loc[idx, f"{m}_mark"] = mark
        table[f"{m}_best"] = table[f"{m}_mark"] == "best"
    return table[columns].reset_index(drop=True)


def epoch_test_table(runs: pd.DataFrame, epochs: pd.DataFrame, epoch: int, cols: str = "method", *,
                     selections: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Test accuracy in % of the weights after ``epoch`` (runs with ``test_at``), by setting × ``cols``; the
    columns of :func:`accuracy_table`. A run that stopped or diverged before ``epoch`` has no value."""
    at = epochs.loc[epochs["epoch"] == epoch, ["run_id", "test_accuracy"]]
    return accuracy_table(runs.drop(columns=["test_accuracy"]).merge(at, on="run_id", how="left"), None, cols,
                          selections=selections)


def test_at_epochs(epochs: pd.DataFrame) -> list[int]:
    """The epochs after which some run scored the test split (``test_at``)."""
    if "test_accuracy" not in epochs or epochs.empty:
        return []
    return sorted(int(e) for e in epochs.loc[epochs["test_accuracy"].notna(), "epoch"].unique())


def selection_table(runs: pd.DataFrame, selections: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per ``[select]`` group (its latest choice): its settings that vary between groups, the axis,
    each candidate value's score (% validation accuracy of the first seed's run; empty when it diverged in its
    first epoch), the chosen value and ``edge`` (:func:`grid_edge`)."""
    selections = current_selections(selections)
    if not selections:
        return pd.DataFrame(columns=["group", "axis", "chosen", "edge"])
    groups = [s["group"] for s in selections]
    varying = [k for k in dict.fromkeys(k for g in groups for k in g)
               if len({json.dumps(g.get(k)) for g in groups}) > 1]
    lines = []
    for sel in selections:
        line: dict[str, Any] = {k: sel["group"].get(k) for k in varying}
        line["axis"] = sel["axis"]
        for c in sel["scores"]:
            score = c.get("score")
            line[_value_text(c["value"])] = None if score is None else 100.0 * float(score)
        line["chosen"] = _value_text(sel["chosen"])
        line["edge"] = grid_edge(sel)
        lines.append(line)
    table = pd.DataFrame(lines)
    if "method" in table:
        order = {m: i for i, m in enumerate(in_order(list(table["method"]), "method"))}
        table = table.sort_values([k for k in varying if k != "method"] + ["method"],
                                  key=lambda s: s.map(order) if s.name == "method" else s, kind="stable")
    return table.reset_index(drop=True)


# -- rendering ----------------------------------------------------------------------------------------


def _cell(mean: float, std: float, digits: int, n: int | None = None, low: float = math.nan,
          high: float = math.nan) -> str:
    """``mean ± sd (n=…; CI low–high)``, the parts there are: no sd or interval for one run; ``–`` for none."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {std:.{digits}f}"
    parts = [f"n={n}"] if n is not None else []
    if isinstance(low, float) and math.isfinite(low):
        parts.append(f"CI {low:.{digits}f}–{high:.{digits}f}")
    return text + (f" ({'; '.join(parts)})" if parts else "")


def _marked(text: str, mark: str) -> tuple[str, bool]:
    return (f"{TIE} {text}" if mark == "tie" else text), mark == "best"


def _accuracy_grid(table: pd.DataFrame, rows: str | Sequence[str], cols: str) -> Grid:
    """(column headers, rows of (text, bold) cells, row labels) for a long accuracy table."""
    rows = [rows] if isinstance(rows, str) else list(rows)
    col_values = list(dict.fromkeys(table[cols]))
    row_values = list(dict.fromkeys(tuple(r[k] for k in rows) for r in table.to_dict("records")))
    by = {(tuple(r[k] for k in rows), r[cols]): r for r in table.to_dict("records")}
    grid = []
    for rv in row_values:
        cells = []
        for cv in col_values:
            r = by.get((rv, cv))
            if r is None:
                cells.append(("", False))
                continue
            text = _cell(r["mean"], r["std"], 2, r["n"], r["ci_low"], r["ci_high"])
            if r["setting"]:
                text += f" [{r['setting']}]"
            if r["n_diverged"]:
                text += f" ({r['n_diverged']} div.)"
            cells.append(_marked(text, r["mark"]))
        grid.append(cells)
    labels = [", ".join(_value_text(v) for v in rv) for rv in row_values]
    return [str(c) for c in col_values], grid, labels


def _metrics_grid(table: pd.DataFrame, rows: Sequence[str]) -> Grid:
    headers = [METRIC_LABELS[m] for m in METRICS]
    grid, labels = [], []
    for r in table.to_dict("records"):
        labels.append(", ".join(_value_text(r[k]) for k in rows) + (f" [{r['setting']}]" if r["setting"] else "")
                      + f" (n={r['n']})")
        cells = [_marked(_cell(r[f"{m}_mean"], r[f"{m}_std"], 2 if m in PERCENT_METRICS else 4, None,
                               r[f"{m}_ci_low"], r[f"{m}_ci_high"]), r[f"{m}_mark"]) for m in METRICS]
        if r["n_diverged"]:
            cells[-1] = (cells[-1][0] + f" ({r['n_diverged']} div.)", cells[-1][1])
        grid.append(cells)
    return headers, grid, labels


def _selection_grid(table: pd.DataFrame) -> Grid:
    fixed = {"axis", "chosen", "edge"}
    values = [c for c in table.columns if c not in fixed and c not in _group_columns(table)]
    if all(is_number(v) for v in values):
        values = sorted(values, key=float)  # a wider grid's values after the first sweep's: in order
    keys = _group_columns(table)
    grid, labels = [], []
    for r in table.to_dict("records"):
        labels.append(", ".join(_value_text(r[k]) for k in keys) or "all runs")
        cells = [("" if pd.isna(r[v]) else f"{r[v]:.2f}", v == r["chosen"]) if v in r else ("", False)
                 for v in values]
        edge = r.get("edge") or ""
        grid.append([*cells, (f"{EDGE_MARK} {edge}" if edge else "", False)])
    return [*values, "grid edge"], grid, labels


def _group_columns(table: pd.DataFrame) -> list[str]:
    cols = list(table.columns)
    return cols[:cols.index("axis")] if "axis" in cols else []


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
    """An HTML table (class ``sortable``: the report's script sorts it by a click on a column's head); bold cells
    in ``<b>``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [corner] + headers)
    body = []
    for label, cells in zip(labels, grid):
        tds = "".join(f"<td><b>{html.escape(t)}</b></td>" if bold and t else f"<td>{html.escape(t)}</td>"
                      for t, bold in cells)
        body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


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

    @property
    def has_values(self) -> bool:
        """Whether any cell holds a number: a table of dashes (no finished run, or runs that recorded no test
        metrics) is left off the report's pages rather than shown as a section of ``–``."""
        return any(text.replace(TIE, "").strip() not in ("", "–") for row in self.grid for text, _bold in row)

    def markdown(self) -> str:
        return markdown_table(self.corner, self.headers, self.grid, self.labels)

    def html(self) -> str:
        return html_table(self.corner, self.headers, self.grid, self.labels)


def _seeds_note(table: pd.DataFrame) -> str:
    ns = sorted({int(n) for n in table["n"]}) if len(table) else [0]
    runs = f"{ns[0]} seed{'s' if ns[0] != 1 else ''}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds per cell"
    return (f"mean ± sample sd over {runs}; n = runs in the cell; CI = 95 % t interval of the mean (mean ± "
            "t(0.975, n-1)·sd/√n; none for n = 1)")


def _marks_note(where: str) -> str:
    return (f"Bold: the best {where}, its interval overlapping no other's; {TIE}: tied for the best (the "
            "intervals overlap, or a cell has no interval).")


def _selection_note(selections: Sequence[Mapping[str, Any]] | None, table: pd.DataFrame) -> str:
    if selections:
        axes = ", ".join(dict.fromkeys(s["axis"] for s in selections))
        return (f" {axes} chosen per method and setting on validation (the first seed's best validation accuracy, "
                "[select]); every seed at the choice; [..] names the value each cell took.")
    if len(table) and "setting" in table and any(table["setting"]):
        return (" Where a cell held several values of a tuned key (lr), the one with the best mean validation "
                "accuracy; [..] names it.")
    return ""


def _accuracy_title(keys: Sequence[str]) -> tuple[str, str]:
    if list(keys) == ["data"]:
        return "table1_dataset_method", "dataset × method (the ASV poster's Tables 1 and 2)"
    if list(keys) == ["optimizer"]:
        return "table3_optimizer_method", "optimizer × method (the ASV poster's Table 3)"
    return f"table_{'_'.join(keys)}_method", f"{', '.join(AXIS_LABELS.get(k, k) for k in keys)} × method"


def build_tables(runs: pd.DataFrame, epochs: pd.DataFrame | None = None,
                 selections: Sequence[Mapping[str, Any]] | None = None) -> list[Table]:
    """The report's tables, from :func:`~initscope.experiments.tables.frames.load_runs`' frame (and the epochs
    and the ``[select]`` choices of the store): test accuracy by setting × method, the Glorot/He metrics, the
    test accuracy after each ``test_at`` epoch, the selection."""
    tables = []
    t = accuracy_table(runs, selections=selections)
    keys = [c for c in t.columns if c not in ("method", "mean", "std", "ci_low", "ci_high", "n", "n_diverged",
                                                "val_mean", "setting", "mark", "best")]
    key, what = _accuracy_title(keys)
    headers, grid, labels = _accuracy_grid(t, keys, "method")
    tables.append(Table(key, f"Test accuracy (%) by {what}", f"Test accuracy at the checkpoint of best validation "
                        f"accuracy (chosen on validation, reported on test); {_seeds_note(t)}. {_marks_note('per row')}"
                        + _selection_note(selections, t), t, ", ".join(AXIS_LABELS.get(k, k) for k in keys), headers,
                        grid, labels))
    t = test_metrics_table(runs, ("model", "method"), selections=selections)
    rows = [c for c in t.columns if not any(c.startswith(f"{m}_") for m in METRICS) and
            c not in ("n", "n_diverged", "setting")]
    headers, grid, labels = _metrics_grid(t, rows)
    tables.append(Table("table_model_method_test", "Table 1 (Glorot/He paper): test metrics by model × method",
                        "Checkpoint of best validation accuracy; accuracy and macro precision, recall, F1 in %; "
                        f"{_seeds_note(t)}. {_marks_note('method per column, within a model (lowest loss)')}"
                        + _selection_note(selections, t), t, ", ".join(rows), headers, grid, labels))
    for epoch in test_at_epochs(epochs if epochs is not None else pd.DataFrame()):
        t = epoch_test_table(runs, epochs, epoch, selections=selections)
        keys = [c for c in t.columns if c not in ("method", "mean", "std", "ci_low", "ci_high", "n", "n_diverged",
                                                    "val_mean", "setting", "mark", "best")]
        headers, grid, labels = _accuracy_grid(t, keys, "method")
        tables.append(Table(f"table_epoch{epoch}_test", f"Test accuracy (%) after epoch {epoch}",
                            f"The weights after epoch {epoch} (not the best checkpoint) on the test split; "
                            f"{_seeds_note(t)}. {_marks_note('per row')}" + _selection_note(selections, t), t,
                            ", ".join(AXIS_LABELS.get(k, k) for k in keys), headers, grid, labels))
    if selections:
        t = selection_table(runs, selections)
        headers, grid, labels = _selection_grid(t)
        axes = ", ".join(dict.fromkeys(s["axis"] for s in selections))
        tables.append(Table("selection", f"Selection: validation accuracy (%) of each {axes} (first seed)",
                            f"Each group's selection runs (the first seed at every {axes} of the grid) and their best "
                            f"validation accuracy; bold: the {axes} chosen, at which every seed then ran. The test "
                            f"split takes no part in the choice. {EDGE_MARK} top/bottom: the choice is the grid's "
                            "largest/smallest value and beat its neighbour, so the best value may lie beyond the "
                            "grid: widen it (a later sweep's wider grid is chosen anew and replaces the choice).",
                            t, ", ".join(_group_columns(t)) or "group", headers, grid, labels))
    return tables


def weight_layers(config: Mapping[str, Any]) -> int:
    """How many weight layers (convs and linears, the papers' "depth") the model of a run's config has:
    built once with random weights on a 3-channel, 10-class input (neither changes the count)."""
    from initscope.experiments.config.run import RunConfig
    from initscope.experiments.training.loop import build_model
    from initscope.rules.registry import is_weight_module

    # Only the model's fields matter; the data source need not be readable where the report is written.
    model = build_model(RunConfig.from_dict({**config, "data": "synthetic", "data_root": None}), 3, 10)
    return sum(1 for m in model.modules() if is_weight_module(m))


# What a depth figure may vary per line and per run; every other setting is the protocol, one for all.
_PER_RUN = frozenset({"model", "method", "seed", "lr", "optimizer", "residual", "distribution"})


def _family(model: str) -> str:
    """A net's name without its numbers: ``resnet110`` → ``resnet``, ``mobilenet_v1`` → ``mobilenet_v``."""
    return "".join(ch for ch in str(model) if not ch.isdigit())


def _one_protocol(counted: pd.DataFrame) -> bool:
    """Whether every run shares the same settings outside :data:`_PER_RUN`."""
    seen = {json.dumps({k: v for k, v in dict(cfg).items() if k not in _PER_RUN}, sort_keys=True, default=str)
            for cfg in counted["config"]}
    return len(seen) == 1


def depth_table(runs: pd.DataFrame, epochs: pd.DataFrame, *,
                selections: Sequence[Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Test accuracy (%) against depth, one row per (method, model, epoch): ``depth`` (weight layers),
    ``epoch`` (each ``test_at`` epoch, or ``"best"``: the best-validation checkpoint where no run has
    ``test_at``), and :class:`Stat`'s mean, sd, n and interval over the seeds. Empty unless the runs span
    at least two depths of one family of nets (names alike but for their numbers: resnet20, resnet56,
    resnet110; plain34, plain50) trained the same way (every setting but the model and what a sweep's
    grid varies per run alike): between MobileNet v1 at batch 128 and ResNet-50 at batch 32 a line
    against depth would draw a difference of architecture and protocol as one of depth."""
    counted = _table_runs(runs, selections)
    if counted.empty or counted["cfg_model"].nunique() < 2:
        return pd.DataFrame()
    if len({_family(m) for m in counted["cfg_model"].unique()}) > 1 or not _one_protocol(counted):
        return pd.DataFrame()
    depth = {model: weight_layers(group["config"].iloc[0]) for model, group in counted.groupby("cfg_model")}
    if len(set(depth.values())) < 2:
        return pd.DataFrame()
    at = test_at_epochs(epochs)
    scores = ([(e, epochs.loc[epochs["epoch"] == e].set_index("run_id")["test_accuracy"]) for e in at] if at
              else [("best", counted.set_index("run_id")["test_accuracy"])])
    rows = []
    for epoch, score in scores:
        for (method, model), group in counted.groupby(["cfg_method", "cfg_model"], sort=False):
            st = Stat.of(100 * score.reindex(group["run_id"]).to_numpy(dtype=float))
            rows.append({"method": method, "model": model, "depth": depth[model], "epoch": epoch, "mean": st.mean,
                         "std": st.std, "n": st.n, "low": st.low, "high": st.high})
    return pd.DataFrame(rows).sort_values(["epoch", "method", "depth"], key=lambda c: c.astype(str), kind="stable")
