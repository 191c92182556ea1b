"""``initscope report``: a results store rendered as the papers' tables and the training curves, on one
self-contained HTML page, in Markdown, and as CSV (the numbers: :mod:`.papers`; the frames: :mod:`.frames`).

The HTML page is interactive where it has figures (:mod:`initscope.plotting.web`: plotly.js inline, zoom,
hover, the histograms of every layer) and its tables sort by any column; the PNG and SVG figures are
written under ``figures/`` for papers and embedded in the page as its static copies."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from initscope.errors import OutputError
from initscope.experiments.tables.frames import (connect, load_epochs, load_runs, load_selections, load_sweeps,
                                                 select_runs, selections_where, varying_keys)
from initscope.experiments.tables.papers import (Table, apply_selections, build_tables, counted_runs, current_selections,
                                                 in_order, md_code, md_text, method_variants)
from initscope.fileio import atomic_write_text, disk_error

MAX_CURVE_FIGURES = 24


@dataclass
class Report:
    """What :func:`write_report` made: the tables, the figures and the files written."""

    out_dir: Path
    tables: list[Table]
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png)
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # the page's interactive figures: (title, caption, Plotly spec, the PNG of the same figure)
    interactive: list[tuple[str, str, dict, Path]] = field(default_factory=list)

    def table(self, key: str) -> Table:
        for t in self.tables:
            if t.key == key:
                return t
        raise KeyError(f"no table {key!r}; have: {', '.join(t.key for t in self.tables)}")


def _curve_frames(runs: pd.DataFrame, epochs: pd.DataFrame) -> list[tuple[str, pd.DataFrame, int]]:
    """One history frame per group of runs that differ only in method and seed; ``label`` = method,
    values averaged over seeds epoch by epoch."""
    counted = counted_runs(runs)
    if counted.empty or epochs.empty:
        return []
    if "selection" in counted:  # a [select] group's runs at the values not chosen have no curves
        counted = counted[counted["selection"] != "candidate"]
    counted = method_variants(counted)  # asv-backward (residual=zero) is a line of its own, as in the tables
    group_keys = [k for k in varying_keys(counted) if k not in ("method", "seed")]
    cols = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    out = []
    # dropna=False: a key that some runs leave unset (residual=None) still groups them
    groups = (counted.groupby([f"cfg_{k}" for k in group_keys], sort=False, dropna=False) if group_keys
              else [((), counted)])
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        hist = epochs[epochs["run_id"].isin(g["run_id"])].merge(g[["run_id", "cfg_method"]], on="run_id")
        if hist.empty:
            continue
        mean = hist.groupby(["cfg_method", "epoch"], sort=False)[cols].mean().reset_index()
        order = {m: i for i, m in enumerate(in_order(list(mean["cfg_method"]), "method"))}
        mean = mean.sort_values(["cfg_method", "epoch"], key=lambda s: s.map(order) if s.name == "cfg_method" else s)
        mean = mean.rename(columns={"cfg_method": "label"})
        first = g.iloc[0]
        fixed = [f"{first['cfg_data']}", f"{first['cfg_model']}", f"{first['cfg_optimizer']}", f"lr {first['cfg_lr']:g}"]
        name = " · ".join(dict.fromkeys(fixed + [f"{k}={v}" for k, v in zip(group_keys, key)
                                                 if k not in ("data", "model", "optimizer", "lr")]))
        out.append((name, mean, int(g["cfg_seed"].nunique()) if "cfg_seed" in g else 1))
    return out[:MAX_CURVE_FIGURES]


def _probe_frames(runs: pd.DataFrame, elsewhere: str | Path | None = None) -> list[tuple[str, str, pd.DataFrame]]:
    """Probe tables saved beside runs (``<run_dir>/probe.parquet``), concatenated per group of runs that
    differ only in method, first seed only: ``(group, stage, frame)`` with the earliest probe
    (``"initialization"``) and, where a run was probed again, its last (``"end of training"``). A run whose
    folder is not where the database says is looked for as ``<elsewhere>/<run_id>.parquet``."""
    counted = counted_runs(runs)
    if "run_dir" not in counted and elsewhere is None:
        return []
    frames: dict[tuple[str, str], list[pd.DataFrame]] = {}
    first_seed = counted["cfg_seed"].min() if "cfg_seed" in counted else None
    for r in counted.to_dict("records"):
        if first_seed is not None and r["cfg_seed"] != first_seed:
            continue
        candidates = ([Path(r["run_dir"]) / "probe.parquet"] if r.get("run_dir") else []) + (
            [Path(elsewhere) / f"{r['run_id']}.parquet"] if elsewhere is not None else [])
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            continue
        f = pd.read_parquet(path).drop(columns=["method"], errors="ignore").assign(method=r["cfg_method"])
        col = next((c for c in ("step", "epoch") if c in f.columns), None)
        stages = [("initialization", f)] if col is None else [("initialization", f[f[col] == f[col].min()])]
        if col is not None and f[col].max() > f[col].min():
            stages.append(("end of training", f[f[col] == f[col].max()]))
        key = f"{r['cfg_data']} · {r['cfg_model']}"
        for stage, part in stages:
            frames.setdefault((key, stage), []).append(part)
    # methods in the papers' order, as the curves have them: a method keeps its colour across the page's figures
    out = []
    for (k, stage), v in frames.items():
        order = in_order([str(f["method"].iloc[0]) for f in v], "method")
        out.append((k, stage, pd.concat(sorted(v, key=lambda f: order.index(str(f["method"].iloc[0]))),
                                        ignore_index=True)))
    return out


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch == "-" else "_" for ch in text)
    return "_".join(filter(None, keep.split("_")))[:80]


def _what_was_run(db: Path, runs: pd.DataFrame, epochs: pd.DataFrame,
                  selections: Sequence[Mapping[str, Any]], restricted: bool = False) -> dict[str, Any]:
    sweeps = load_sweeps(db)
    # Runs not started yet: every sweep's, or, in a report restricted by ``where``, those of the sweeps
    # it draws runs from (Table 1's report does not announce Table 2's queue as its own).
    kept = set(runs["run_id"])
    planned = {rid for s in sweeps if not restricted or kept & set(s["run_ids"]) for rid in s["run_ids"]}
    with connect(db) as conn:
        present = {r[0] for r in conn.execute("SELECT run_id FROM runs")}
    counts = runs["status"].value_counts().to_dict()
    failed = runs[runs["status"] == "failed"]
    errors = [(r["run_id"], (r["error"] or "").strip().splitlines()[-1:] or [""]) for r in failed.to_dict("records")]
    seconds = float(pd.to_numeric(epochs.get("seconds", pd.Series(dtype=float)), errors="coerce").sum())
    fixed_keys = [k[4:] for k in runs.columns if k.startswith("cfg_") and k[4:] not in varying_keys(runs)]
    fixed = {k: runs[f"cfg_{k}"].iloc[0] for k in fixed_keys if k not in ("device", "workers")} if len(runs) else {}
    return {
        "sweeps": sweeps,
        "counts": {s: int(counts.get(s, 0)) for s in ("finished", "diverged", "failed", "running")},
        "not_started": len(planned - present),
        "total": len(runs),
        "varying": {k: in_order(list(runs[f"cfg_{k}"]), k) for k in varying_keys(runs)},
        "fixed": fixed,
        "failed": [(rid, line[0]) for rid, line in errors],
        "train_seconds": seconds,
        "protocol": protocol(runs, selections),
    }


def _values(runs: pd.DataFrame, key: str, fmt: Any = str) -> str:
    col = f"cfg_{key}"
    if col not in runs:
        return "–"
    values = in_order([v for v in runs[col] if not (isinstance(v, float) and pd.isna(v))], key)
    return ", ".join("none" if v is None else fmt(v) for v in values) or "–"


def _split_text(data: str, root: Any) -> str:
    """How a source is split, as the loaders do it."""
    from initscope.experiments.data import parse_data
    from initscope.experiments.data.folder import SPLIT_FOLDERS, Folder

    try:
        ref = parse_data(data)
    except Exception:  # noqa: BLE001 - a source this release does not know: say nothing about it
        return "split as its source does"
    if ref.source.name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        return "the official test split; validation a stratified, seeded 1/6 of the official train split"
    if isinstance(ref.source, Folder):
        try:
            folder = ref.source.resolve(ref.arg, None if pd.isna(root) else root)
            own = set(SPLIT_FOLDERS) <= set(Folder.subfolders(folder))
        except (OSError, ValueError):  # the report is read where the data are not: say what the loader does
            return ("its own train/ and test/ split (validation a stratified, seeded 1/6 of train/), or 60/20/20 per "
                    "class without one")
        if own:
            return "its own train/ and test/ split; validation a stratified, seeded 1/6 of train/, never of test/"
    return "60/20/20 per class, stratified and seeded"


def protocol(runs: pd.DataFrame, selections: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """What was run, as a reader needs it beside the tables: data and split, resolution, model and width,
    augmentation, the budget (epochs, early stop, where runs stopped), optimizer and learning rates, seeds, the
    selection, devices and time. (label, text) pairs."""
    counted = counted_runs(runs)
    if counted.empty:
        return []
    out: list[tuple[str, str]] = []
    for data, root in dict.fromkeys(zip(counted["cfg_data"], counted.get("cfg_data_root", [None] * len(counted)))):
        sub = counted[counted["cfg_data"] == data]
        extra = []
        if "cfg_limit" in sub and sub["cfg_limit"].notna().any():
            extra.append(f"train limited to {_values(sub, 'limit')} images")
        if "cfg_eval_limit" in sub and sub["cfg_eval_limit"].notna().any():
            extra.append(f"validation and test limited to {_values(sub, 'eval_limit')} images each")
        out.append(("data", f"{data}: {_split_text(data, root)}" + "".join(f"; {e}" for e in extra)))
    out.append(("resolution", _values(counted, "image_size", lambda v: f"{v}×{v}").replace("none", "the source's own")
                + "; pixels " + _values(counted, "normalize")))
    out.append(("model", f"{_values(counted, 'model')}; width {_values(counted, 'width')}; norm "
                         f"{_values(counted, 'norm')}; head {_values(counted, 'head')}"
                + ("; Fixup scalars built in" if "cfg_fixup_scalars" in counted and counted["cfg_fixup_scalars"].any()
                   else "")))
    init = f"{_values(counted, 'method')}"
    for key in ("distribution", "residual"):
        if f"cfg_{key}" in counted and counted[f"cfg_{key}"].notna().any():
            init += f"; {key} {_values(counted, key)}"
    out.append(("initialization", init))
    out.append(("augmentation", _values(counted, "augment")))
    budget = f"at most {_values(counted, 'epochs')} epochs, batch {_values(counted, 'batch_size')}"
    patience = pd.to_numeric(counted.get("cfg_patience", pd.Series(dtype=float)), errors="coerce").fillna(0)
    if (patience > 0).any():
        budget += (f"; early stop on validation accuracy after {_values(counted, 'patience')} epochs without a better "
                   f"one, never before epoch {_values(counted, 'min_epochs')}")
    if "stopped_epoch" in counted:
        stopped = pd.to_numeric(counted["stopped_epoch"], errors="coerce")
        if stopped.notna().any():
            budget += (f"; {int(stopped.notna().sum())} of {len(counted)} runs stopped early (epochs "
                       f"{int(stopped.min())}-{int(stopped.max())}, median {stopped.median():g})")
    best = pd.to_numeric(counted.get("best_epoch", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(best):
        budget += f"; best validation epoch median {best.median():g} (range {int(best.min())}-{int(best.max())})"
    out.append(("budget", budget))
    schedule = _values(counted, "schedule")
    if "step" in schedule:
        schedule += f" (÷{1 / float(counted['cfg_step_gamma'].iloc[0]):g} at epochs {_values(counted, 'step_epochs')})"
    number = lambda v: f"{v:g}"  # noqa: E731
    out.append(("optimization", f"{_values(counted, 'optimizer')}; lr {_values(counted, 'lr', number)}; "
                                f"schedule {schedule}; weight decay {_values(counted, 'weight_decay', number)}"))
    out.append(("seeds", _values(counted, "seed")))
    if selections:
        axes = ", ".join(dict.fromkeys(s["axis"] for s in selections))
        groups = len(current_selections(selections))
        out.append(("selection", f"{axes} chosen on validation ({selections[0]['by']} of the first seed) in "
                                 f"{groups} group(s), then the other seeds at the choice; the tables count "
                                 "the runs at the choice"))
    if "device" in counted and counted["device"].notna().any():
        devices = counted["device"].fillna("not recorded").value_counts()
        threads = ", ".join(str(int(t)) for t in sorted(counted["threads"].dropna().unique())) if "threads" in counted \
            else ""
        out.append(("device", "; ".join(f"{d} ({n} runs)" for d, n in devices.items())
                    + (f"; torch threads per run: {threads}" if threads else "")))
    for col, what in (("cpu_seconds", "CPU"), ("wall_seconds", "wall")):
        if col in counted and counted[col].notna().any():
            v = pd.to_numeric(counted[col], errors="coerce")
            out.append((f"{what} time", f"{v.sum() / 3600:.2f} h over {int(v.notna().sum())} runs (median "
                                        f"{v.median():.0f} s per run)"))
    return out


# The "what was run" summary as lines, each a list of segments, so that Markdown and HTML are rendered
# from one structure and each escapes what it must: a segment is (text, is_code); a line is (level,
# segments): level 0 a paragraph (no segments: a blank line), 1 a bullet, 2 a bullet under it.
Line = tuple[int, list[tuple[str, bool]]]


def _summary_lines(s: dict[str, Any]) -> list[Line]:
    c = s["counts"]
    lines: list[Line] = []

    def text(level: int, *segments: str | tuple[str, bool]) -> None:
        lines.append((level, [seg if isinstance(seg, tuple) else (seg, False) for seg in segments]))

    if s.get("where"):
        text(0, "Only the runs with " + "; ".join(f"{k} in {', '.join(v)}" for k, v in s["where"].items())
             + " (the sweeps below list everything that was asked for).")
        text(0)
    text(0, f"{s['total']} run{'s' if s['total'] != 1 else ''} in the database: {c['finished']} finished, "
            f"{c['diverged']} diverged, {c['failed']} failed, {c['running']} running or interrupted"
            + (f"; {s['not_started']} of the sweeps' runs not started yet" if s["not_started"] else "")
            + f". Training time, summed over runs: {s['train_seconds'] / 60:.1f} min.")
    text(0)
    for sw in s["sweeps"]:
        n = len(sw["run_ids"])
        text(1, "sweep ", (str(sw["name"] or sw["sweep_id"]), True), f" ({n} runs, first started {sw['created_at']}):")
        for k, v in sw["grid"].get("grid", {}).items():
            if isinstance(v, dict):  # learning rates per optimizer
                text(2, f"{k}: " + "; ".join(f"{o}: {', '.join(map(str, lr))}" for o, lr in v.items()))
            else:
                text(2, f"{k}: {', '.join(map(str, v))}")
        fixed = sw["grid"].get("run", {})
        if fixed:
            text(2, "fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    if not s["sweeps"]:
        for k, v in s["varying"].items():
            text(1, f"{k}: {', '.join(map(str, v))}")
    if s.get("protocol"):
        text(0)
        text(0, "Protocol (finished and diverged runs):")
        for what, line in s["protocol"]:
            text(1, f"{what}: {line}")
    if s["fixed"]:
        text(0)
        text(0, "Same in every run: " + ", ".join(f"{k}={v}" for k, v in s["fixed"].items()) + ".")
    if s["failed"]:
        text(0)
        text(0, "Failed runs (last line of the error):")
        for rid, msg in s["failed"]:
            text(1, (str(rid), True), f": {msg}")
    return lines


def _summary_markdown(s: dict[str, Any]) -> str:
    """The summary in Markdown; every value escaped (:func:`md_text`, :func:`md_code`): a sweep name, a
    folder path or an error holding HTML or Markdown shows as written, and runs nothing."""
    out = []
    for level, segments in _summary_lines(s):
        body = "".join(md_code(t) if code else md_text(t) for t, code in segments)
        out.append(body if level == 0 else "  " * (level - 1) + "- " + body)
    return "\n".join(out)


def _summary_html(s: dict[str, Any]) -> str:
    """The summary as HTML: paragraphs, two-level lists, code; every value escaped."""
    out, depth = [], 0
    for level, segments in _summary_lines(s):
        while depth < level:
            out.append("<ul>")
            depth += 1
        while depth > level:
            out.append("</ul>")
            depth -= 1
        body = "".join(f"<code>{html.escape(t)}</code>" if code else html.escape(t) for t, code in segments)
        if level:
            out.append(f"<li>{body}</li>")
        elif body:
            out.append(f"<p>{body}</p>")
    out.extend("</ul>" for _ in range(depth))
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f4f4f4}tbody th{text-align:left}caption{caption-side:bottom;font-size:12px;
color:#555;text-align:left;padding-top:4px}img{max-width:100%;height:auto}code{background:#f4f4f4;padding:0 3px}
.note{color:#555}figcaption{color:#555;font-size:13px}details.static summary{cursor:pointer;font-weight:600}"""



def write_report(db: str | Path, out_dir: str | Path, *, title: str | None = None,
                 figures: bool = True, where: Mapping[str, Sequence[Any]] | None = None,
                 probes: str | Path | None = None) -> Report:
    """Render the tables (Markdown, HTML, CSV) and the curves of a results database into ``out_dir``.

    Writes ``report.md``, ``report.html`` (self-contained: interactive figures with plotly.js inline, the PNGs
    embedded as their static copies, tables that sort by any column; only tables with a value), one CSV per
    table (long form, with ``std``, ``n`` and the chosen ``setting``), ``runs.csv`` (every run) and the
    figures as PNG and SVG under ``figures/``. ``where`` keeps only the runs whose config matches
    (``{"optimizer": ["adam"]}``), for a table restricted as a paper's was.
    ``probes`` is a folder of ``<run_id>.parquet`` probe tables, read where a
    run's own folder is not at the path the database holds (a database copied from another machine;
    ``docs/results/campaign/snapshot.sh`` copies them).
    """
    db, out_dir = Path(db), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file; the report is a folder (report.md, report.html, CSVs, "
                          "figures): give a folder's path")
    runs = load_runs(db)
    if where:
        runs = select_runs(runs, where)
    selections = selections_where(load_selections(db), where)
    runs = apply_selections(runs, selections)
    epochs = load_epochs(db)
    epochs = epochs[epochs["run_id"].isin(runs["run_id"])]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, out_dir, "creating the report folder") from None
    tables = build_tables(runs, epochs, selections) if len(runs) else []
    report = Report(out_dir, tables)
    report.summary = _what_was_run(db, runs, epochs, selections, restricted=bool(where)) if len(runs) else {
        "sweeps": load_sweeps(db), "counts": dict.fromkeys(("finished", "diverged", "failed", "running"), 0),
        "not_started": 0, "total": 0, "varying": {}, "fixed": {}, "failed": [], "train_seconds": 0.0, "protocol": []}
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
        from initscope.plotting import web
        from initscope.plotting.curves import plot_training_curves

        fig_dir = out_dir / "figures"
        for name, frame, n in _curve_frames(runs, epochs):
            png = fig_dir / f"curves_{_slug(name)}.png"
            curve_title = f"{name} (mean over {n} seed{'s' if n != 1 else ''})"
            plot_training_curves(frame, path=png, title=curve_title)
            caption = f"Training curves: {name}; training dashed, validation solid; accuracy in %."
            report.figures.append((caption, png))
            report.interactive.append((f"Training curves: {name}", caption, web.curves_figure(frame, title=curve_title),
                                       png))
        report.figures.extend(_write_depth_figure(runs, epochs, selections, fig_dir, report.interactive))
        report.figures.extend(_write_probe_figures(runs, fig_dir, report.interactive, probes))
        report.files.extend(p for _, p in report.figures)

    heading = title or f"initscope results: {db.name}"
    atomic_write_text(out_dir / "report.md", _render_markdown(report, heading))
    atomic_write_text(out_dir / "report.html", _render_html(report, heading))
    report.files[:0] = [out_dir / "report.md", out_dir / "report.html"]
    return report


def _write_depth_figure(runs: pd.DataFrame, epochs: pd.DataFrame, selections, fig_dir: Path,
                        interactive: list) -> list[tuple[str, Path]]:
    from initscope.experiments.tables.papers import depth_table
    from initscope.plotting import web
    from initscope.plotting.depth_accuracy import plot_accuracy_vs_depth

    table = depth_table(runs, epochs, selections=selections)
    if table.empty:
        return []
    png = fig_dir / "accuracy_vs_depth.png"
    plot_accuracy_vs_depth(table, path=png)
    caption = ("Test accuracy (%) against depth (weight layers), mean over seeds with the 95 % t interval of the "
               "mean as error bars.")
    interactive.append(("Test accuracy against depth", caption, web.depth_accuracy_figure(table), png))
    return [(caption, png)]


# The probes of a sweep are taken with the training loss (cross-entropy), whose gradient at the logits is
# (softmax - onehot) / batch: decades below the unit output gradient the plans predict for. The depth figure
# therefore draws the backward predictions times E[g²] measured at the output (plot_depth's
# output_grad="measured"), so that measured and predicted are the same quantity.
# (kind, caption, options, stages): the depth figure's predictions are for the initialization only.
_PROBE_PLOTS = (
    ("depth", "variance against depth at initialization: measured (solid), predicted (dashed; backward: × E[g²] "
              "measured at the output, since the predictions are for a unit output gradient and the loss here is "
              "cross-entropy)", {"output_grad": "measured"}, ("initialization",)),
    ("boxes", "weights, activations and weight gradients per layer at {stage} (box q25-q75, whiskers q1-q99)",
     {"quantities": ("weight", "activation", "weight_grad")}, ("initialization", "end of training")),
    ("activation", "activation histograms at {stage}", {"quantity": "activation"},
     ("initialization", "end of training")),
    ("gradient", "gradient histograms at {stage} (cross-entropy loss)", {"quantity": "output_grad"},
     ("initialization", "end of training")),
)


def _write_probe_figures(runs: pd.DataFrame, fig_dir: Path,
                         interactive: list[tuple[str, str, dict, Path]] | None = None,
                         elsewhere: str | Path | None = None) -> list[tuple[str, Path]]:
    probes = _probe_frames(runs, elsewhere)
    if not probes:
        return []
    from initscope.plotting import plot_boxes, plot_depth, plot_histograms, web

    made = []
    for name, stage, frame in probes:
        for kind, caption, kw, stages in _PROBE_PLOTS:
            if stage not in stages:
                continue
            caption = caption.format(stage=stage)
            png = fig_dir / f"probe_{kind}_{_slug(name)}{'' if stage == 'initialization' else '_end'}.png"
            try:
                if kind == "depth":
                    plot_depth(frame, path=png, title=f"{name}: {caption.split(':')[0]}", **kw)
                    spec = web.depth_figure(frame, title=name, **kw)
                elif kind == "boxes":
                    plot_boxes(frame, path=png, title=f"{name}: {caption}", **kw)
                    spec = web.boxes_figure(frame, title=f"{name}: {caption}", **kw)
                else:
                    plot_histograms(frame, path=png, title=f"{name}: {caption}", **kw)
                    spec = web.histogram_figure(frame, title=f"{name}: {caption}", **kw)
            except ValueError:  # e.g. the probe ran without histograms: no such figure
                continue
            made.append((f"Probe, {name}: {caption}.", png))
            if interactive is not None:
                interactive.append((f"Probe, {name}: {caption.split(':')[0].split(' (')[0]}",
                                    f"Probe, {name}: {caption}.", spec, png))
    return made


_NO_RUNS = "No finished or diverged runs yet."


def _sections(tables: Sequence[Table]) -> list[Table]:
    """The tables the pages show (every CSV is written regardless): those with a value, and of the two that hold
    the test accuracy of the same cells, the one in the form of the paper the grid follows. Where the models vary
    (the Glorot/He paper's grid: architectures × initializations) the accuracy pivot, the ASV poster's form,
    repeats the Glorot/He table's accuracy column cell for cell, and is left off; where one model is trained (the
    poster's grids), the pivot is the poster's table and the Glorot/He table adds precision, recall and F1."""
    shown = [t for t in tables if t.has_values]  # a table of dashes is no section
    glorot_he = any(t.key == "table_model_method_test" for t in shown)
    # the pivot's key ends in "_method" (table1_dataset_method, table_model_method, ...); its rows are the keys
    # that vary, so a "model" column means the models do
    return [t for t in shown if not (glorot_he and t.key.endswith("_method") and "model" in t.data.columns)]


def _no_tables(report: Report) -> str:
    """What the pages say in place of the tables when none has a value."""
    counts = report.summary.get("counts", {})
    if counts.get("finished", 0) + counts.get("diverged", 0):
        return "No table has a value: the runs recorded no test metrics (see runs.csv)."
    return _NO_RUNS


def _render_markdown(report: Report, heading: str) -> str:
    # the heading (--title, or the database's file name), titles and captions hold values: escaped too
    parts = [f"# {md_text(heading)}", "", "## What was run", "", _summary_markdown(report.summary), ""]
    shown = _sections(report.tables)
    if not shown:
        parts += [_no_tables(report), ""]
    for t in shown:
        csv = md_code(f"{t.key}.csv")
        parts += [f"## {md_text(t.title)}", "", t.markdown(), "", f"*{md_text(t.caption)}* CSV: {csv}.", ""]
    if report.figures:
        parts += ["## Figures", ""]
        for caption, png in report.figures:
            rel = png.relative_to(report.out_dir).as_posix()  # a slug: letters, digits, - and _
            parts += [f"![{md_text(caption)}]({rel})", "", md_text(caption), ""]
    return "\n".join(parts)


def _render_html(report: Report, heading: str) -> str:
    from initscope.plotting import web
    from initscope.plotting.web import page_figure, static_figures

    body = [f"<h1>{html.escape(heading)}</h1>", "<h2>What was run</h2>", _summary_html(report.summary)]
    shown = _sections(report.tables)
    if not shown:
        body.append(f"<p>{html.escape(_no_tables(report))}</p>")
    if any(t.grid for t in shown):
        body.append('<p class="note">Click a column\'s head to sort the table by it.</p>')
    for t in shown:
        table = t.html().replace('<table class="sortable">',
                                 f'<table class="sortable"><caption>{html.escape(t.caption)}</caption>', 1)
        body += [f"<h2>{html.escape(t.title)}</h2>", table]
    if report.figures:
        body.append("<h2>Figures</h2>")
        if report.interactive:
            body.append('<p class="note">Drag to zoom, double-click to zoom out, hover for the numbers, click a '
                        "name in the legend to hide or show it.</p>" + web.NOSCRIPT)
        for i, (title, caption, spec, png) in enumerate(report.interactive):
            rel = png.relative_to(report.out_dir).as_posix()
            body.append(web.figure_html(spec, f"fig-{i}", title=title, caption=caption,
                                        links=(("PNG", rel), ("SVG", rel[:-4] + ".svg"))))
        body.append(static_figures([page_figure("", caption, png.read_bytes()) for caption, png in report.figures],
                                   open_=not report.interactive))
    scripts = web.page_scripts() if report.interactive else web.sort_script_only()
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(heading)}</title><style>{_CSS}{web.STYLE}</style></head><body>"
            + "\n".join(body) + scripts + "</body></html>")
