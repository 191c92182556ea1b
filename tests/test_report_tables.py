"""The report's tables from a database whose every number is known, checked against a direct computation."""

import itertools
import math
import re
import statistics
from types import SimpleNamespace

import pandas as pd
import pytest

from pages import outside_scripts, specs, strings

from initscope.experiments import tables as rp
from initscope.experiments.tables.results import _probe_frames
from initscope.experiments.store import Store

DATA = ("A", "B")
METHODS = ("asv-backward", "xavier")  # listed out of the papers' order on purpose
OPTS = ("adam", "sgd")
LRS = (1e-3, 1e-2)
SEEDS = (0, 1, 2)


def best_val(data, method, opt, lr, seed):
    """A made-up best validation accuracy with structure: every factor matters, lr's effect depends on
    the optimizer (so the chosen lr differs between cells), seeds scatter."""
    v = 0.5 + (0.1 if data == "B" else 0.0) + (0.05 if method == "asv-backward" else 0.0)
    v += (0.08 if lr == 1e-3 else 0.0) if opt == "adam" else (0.06 if lr == 1e-2 else -0.02)
    v += 0.01 * [0.0, 1.0, -0.5][seed] + (0.003 * seed if method == "xavier" else 0.0)
    return v


def test_metric(data, method, opt, lr, seed, m):
    base = {"accuracy": 0.9, "precision": 0.85, "recall": 0.8, "f1": 0.82, "loss": 0.5}[m]
    return base * best_val(data, method, opt, lr, seed) + 0.001 * seed


test_metric.__test__ = False  # a helper, not a pytest test


def cfg(data, method, opt, lr, seed):
    return {"data": data, "model": "plain34", "method": method, "optimizer": opt, "lr": lr, "seed": seed,
            "epochs": 3, "width": 8, "device": "auto"}


def rid(*key):
    return "_".join(map(str, key))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("known") / "known.db"
    with Store(path) as s:
        s.add_sweep("s1", "known", {"grid": {"data": list(DATA), "method": list(METHODS)}, "run": {"epochs": 3}},
                    [rid(*k) for k in itertools.product(DATA, METHODS, OPTS, LRS, SEEDS)] + ["never_started"])
        for key in itertools.product(DATA, METHODS, OPTS, LRS, SEEDS):
            v = best_val(*key)
            s.claim(rid(*key), cfg(*key))
            history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": a, "val_loss": 1.1 / e,
                        "val_accuracy": a, "lr": key[3], "seconds": 1.0}
                       for e, a in ((1, 0.5 * v), (2, v), (3, 0.9 * v))]
            s.finish(SimpleNamespace(run_id=rid(*key), status="finished", history=history, best_epoch=2,
                                     test={m: test_metric(*key, m) for m in rp.METRICS}, diverged_epoch=None,
                                     error=None, checkpoint=None))
        # a failed run in a cell that must not count, and a running one
        s.claim("failed_one", cfg("A", "xavier", "adam", 1e-3, 7))
        s.fail("failed_one", "Traceback (most recent call last):\nRuntimeError: out of memory")
        s.claim("running_one", cfg("A", "xavier", "adam", 1e-3, 8))
    return path


def expected_cell(cell_keys, cell_vals, value_of):
    """Direct computation: among the settings of the other keys, the one with the highest mean best
    validation accuracy over seeds; returns (mean, std, setting) of value_of over that setting's seeds."""
    axes = {"data": DATA, "method": METHODS, "optimizer": OPTS, "lr": LRS}
    others = [k for k in axes if k not in cell_keys]
    best = None
    for setting in itertools.product(*(axes[k] for k in others)):
        full = dict(zip(cell_keys, cell_vals)) | dict(zip(others, setting))
        keys = [(full["data"], full["method"], full["optimizer"], full["lr"], s) for s in SEEDS]
        score = statistics.mean(best_val(*k) for k in keys)
        if best is None or score > best[0]:
            best = (score, keys, dict(zip(others, setting)))
    values = [value_of(*k) for k in best[1]]
    return statistics.mean(values), statistics.stdev(values), best[2]


def t_interval(values):
    """The 95 % t interval of the mean, computed directly."""
    from scipy import stats

    n, m, sd = len(values), statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def test_accuracy_table_rows_are_settings_and_only_lr_is_chosen_on_validation(db):
    runs = rp.load_runs(db)
    table = rp.accuracy_table(runs)
    # data and optimizer both vary: every (data, optimizer) is a row of its own, never a choice
    assert list(table.columns[:3]) == ["data", "optimizer", "method"]
    assert len(table) == len(DATA) * len(OPTS) * len(METHODS)
    assert list(table["method"][:2]) == ["xavier", "asv-backward"]  # the papers' order
    for r in table.to_dict("records"):
        keys = ["data", "optimizer", "method"]
        mean, std, setting = expected_cell(keys, [r[k] for k in keys], lambda *k: 100 * test_metric(*k, "accuracy"))
        assert r["mean"] == pytest.approx(mean, abs=1e-9) and r["std"] == pytest.approx(std, abs=1e-9)
        lo, hi = t_interval([100 * test_metric(r["data"], r["method"], r["optimizer"], setting["lr"], s, "accuracy")
                             for s in SEEDS])
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert r["n"] == 3 and r["n_diverged"] == 0 and r["setting"] == f"lr={setting['lr']:g}"
        # the lr was chosen on validation: the cell's validation mean is the best of its lrs
        assert r["val_mean"] == pytest.approx(100 * statistics.mean(
            best_val(r["data"], r["method"], r["optimizer"], setting["lr"], s) for s in SEEDS))
    restricted = rp.accuracy_table(runs, "data")  # rows asked for by data: the optimizer still makes rows too
    assert list(restricted.columns[:3]) == ["data", "optimizer", "method"] and len(restricted) == len(table)


def test_test_metrics_table_matches_direct_computation(db):
    runs = rp.load_runs(db)
    table = rp.test_metrics_table(runs, ("model", "method"))
    assert list(table.columns[:4]) == ["data", "optimizer", "model", "method"]
    for r in table.to_dict("records"):
        for m in rp.METRICS:
            # accuracy, precision, recall and F1 in %, as the accuracy tables and the curves give them (issue 16,
            # item 5); the loss as recorded
            scale = 1.0 if m == "loss" else 100.0
            mean, std, _ = expected_cell(["data", "optimizer", "method"], [r["data"], r["optimizer"], r["method"]],
                                         lambda d, me, o, lr, s, m=m: scale * test_metric(d, me, o, lr, s, m))
            assert r[f"{m}_mean"] == pytest.approx(mean, abs=1e-12)
            assert r[f"{m}_std"] == pytest.approx(std, abs=1e-12)


def test_written_report(db, tmp_path):
    rep = rp.write_report(db, tmp_path / "out", title="known")
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    t = rep.table("table_data_optimizer_method").data
    cell = t[(t["data"] == "A") & (t["optimizer"] == "adam") & (t["method"] == "asv-backward")].iloc[0]
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f} (n=3; CI {cell['ci_low']:.2f}–{cell['ci_high']:.2f})"
    assert text in md and text in page
    assert "Test accuracy at the checkpoint of best validation accuracy" in md
    back = pd.read_csv(tmp_path / "out" / "table_data_optimizer_method.csv")  # the long table, numbers intact
    assert back["mean"].to_numpy() == pytest.approx(t["mean"].to_numpy())
    assert {"ci_low", "ci_high", "n", "mark", "setting"} <= set(back.columns)
    runs_csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs_csv) == 2 * 2 * 2 * 2 * 3 + 2 and {"method", "lr", "status", "test_f1"} <= set(runs_csv.columns)
    # what was run: counts by status, the grid, the failure's message, the run not started
    assert "48 finished, 0 diverged, 1 failed, 1 running" in md
    assert "1 of the sweeps' runs not started yet" in md
    assert "RuntimeError: out of memory" in md and "RuntimeError: out of memory" in page
    assert "method: asv-backward, xavier" in md
    # curves: one figure per (data, optimizer, lr) group, embedded in the page: interactive, and its PNG as the
    # static copy
    assert len(rep.figures) == 8 and all(p.is_file() for _, p in rep.figures)
    markup = outside_scripts(page)
    assert markup.count('src="data:image/png;base64,') == 8 and len(specs(page)) == 8
    assert "src=\"figures/" not in page  # self-contained
    # the Glorot/He table in %, its header saying so, as the accuracy table's cells are
    metrics = rep.table("table_model_method_test")
    assert metrics.headers[:4] == ["Acc. (%)", "Pre. (%)", "Rec. (%)", "F1 (%)"] and metrics.headers[4] == "Loss"
    acc = metrics.data["accuracy_mean"]
    assert acc.between(30, 100).all() and f"{acc.iloc[0]:.2f}" in md


def test_diverged_runs_count_with_what_they_reached(tmp_path):
    db = tmp_path / "d.db"
    with Store(db) as s:
        for seed, (status, vals, acc) in enumerate((("finished", [0.5, 0.6], 0.62), ("diverged", [0.3], 0.28),
                                                    ("diverged", [], None))):
            key = ("A", "xavier", "adam", 1e-3, seed)
            s.claim(rid(*key), cfg(*key))
            hist = [{"epoch": e + 1, "val_accuracy": v, "train_loss": 1.0} for e, v in enumerate(vals)]
            s.finish(SimpleNamespace(run_id=rid(*key), status=status, history=hist,
                                     best_epoch=len(vals) or None, test={} if acc is None else {"accuracy": acc},
                                     diverged_epoch=len(vals) + 1, error=None, checkpoint=None))
    t = rp.accuracy_table(rp.load_runs(db))
    (r,) = t.to_dict("records")
    assert r["n"] == 2 and r["n_diverged"] == 2  # the run diverged in epoch 1 has no value
    assert r["mean"] == pytest.approx(45.0) and r["std"] == pytest.approx(statistics.stdev([62.0, 28.0]))
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    assert "45.00 ± 24.04 (n=2; CI " in (tmp_path / "out" / "report.md").read_text()
    assert "(2 div.)" in (tmp_path / "out" / "report.md").read_text()
    assert not math.isnan(rep.summary["train_seconds"])


def test_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results database"):
        rp.load_runs(tmp_path / "nope.db")


def test_where_restricts_the_tables(db, tmp_path):
    rep = rp.write_report(db, tmp_path / "w", figures=False, where={"optimizer": ["adam"], "lr": ["0.001"]})
    t1 = rep.table("table1_dataset_method").data
    assert list(t1["data"].unique()) == ["A", "B"] and set(t1["setting"]) == {""}  # a row per dataset, no choice
    cell = t1[(t1["method"] == "xavier") & (t1["data"] == "A")].iloc[0]
    assert cell["mean"] == pytest.approx(statistics.mean(100 * test_metric("A", "xavier", "adam", 1e-3, s, "accuracy")
                                                         for s in SEEDS))
    md = (tmp_path / "w" / "report.md").read_text()
    assert "Only the runs with optimizer in adam; lr in 0.001" in md and "14 runs in the database" in md
    with pytest.raises(ValueError, match="where: unknown key 'optimiser'; valid: .*optimizer"):
        rp.write_report(db, tmp_path / "w2", where={"optimiser": ["adam"]})
    # a filter that keeps nothing (a typo, a sweep not run yet) is refused, naming what there is
    with pytest.raises(ValueError, match="no run has optimizer in adma; the runs have optimizer: .*adam"):
        rp.write_report(db, tmp_path / "w3", where={"optimizer": ["adma"]})
    with pytest.raises(ValueError, match="no run has lr in 0.5; the runs the filters before it kept have lr: "):
        rp.write_report(db, tmp_path / "w4", where={"optimizer": ["adam"], "lr": ["0.5"]})
    assert not (tmp_path / "w3").exists()


HEAD_GRAD = {"xavier": 2e-5, "asv-backward": 3e-4}  # E[g²] at the logits of a cross-entropy loss: far below 1


def test_probe_frames_become_figures(tmp_path, monkeypatch):
    from probe_frames import make_frame

    import initscope.plotting

    drawn = []  # the depth figures the report draws, to read back
    real = initscope.plotting.plot_depth
    monkeypatch.setattr(initscope.plotting, "plot_depth", lambda *a, **kw: drawn.append(real(*a, **kw)) or drawn[-1])
    db = tmp_path / "p.db"
    frames = {}
    with Store(db) as s:
        for method in ("xavier", "asv-backward"):
            key = ("A", method, "adam", 1e-3, 0)
            run_dir = tmp_path / "runs" / rid(*key)
            run_dir.mkdir(parents=True)
            init = make_frame(methods=(method,)).drop(columns=["method"]).assign(step=0)
            init.loc[(init["layer"] == "fc") & (init["quantity"] == "output_grad"), "second_moment"] = HEAD_GRAD[method]
            frames[method] = init
            later = init.assign(step=50, layer="later." + init["layer"])  # a second probe, after training
            pd.concat([init, later]).to_parquet(run_dir / "probe.parquet")
            s.claim(rid(*key), cfg(*key))
            s.set_run_dir(rid(*key), run_dir)
            s.finish(SimpleNamespace(run_id=rid(*key), status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}],
                best_epoch=1, test={}, diverged_epoch=None, error=None, checkpoint=None))
    # the first probe is the initialization, the last the end of training (the Glorot/He paper's two states)
    ((name, stage, frame), (name_end, stage_end, end)) = _probe_frames(rp.load_runs(db))
    assert name == name_end == "A · plain34" and set(frame["method"]) == {"xavier", "asv-backward"}
    assert (stage, stage_end) == ("initialization", "end of training")
    assert set(frame["step"]) == {0} and not frame["layer"].str.startswith("later.").any()
    assert set(end["step"]) == {50} and end["layer"].str.startswith("later.").all()
    rep = rp.write_report(db, tmp_path / "out")
    probes = [p for _, p in rep.figures if p.name.startswith("probe_")]
    assert sorted(p.name.split("_")[1] + ("-end" if p.stem.endswith("_end") else "") for p in probes) == [
        "activation", "activation-end", "boxes", "boxes-end", "depth", "gradient", "gradient-end"]
    assert all(p.is_file() for p in probes)
    # a database from another machine: the run folders are gone, the probe tables were copied elsewhere
    moved = tmp_path / "moved"
    moved.mkdir()
    for method in ("xavier", "asv-backward"):
        run_dir = tmp_path / "runs" / rid("A", method, "adam", 1e-3, 0)
        (run_dir / "probe.parquet").rename(moved / f"{rid('A', method, 'adam', 1e-3, 0)}.parquet")
    assert _probe_frames(rp.load_runs(db)) == []
    assert [stage for _, stage, _ in _probe_frames(rp.load_runs(db), moved)] == ["initialization", "end of training"]
    captions = [c for c, p in rep.figures if p.name.startswith("probe_boxes")]
    assert any("at initialization" in c for c in captions) and any("at end of training" in c for c in captions)
    page = (tmp_path / "out" / "report.html").read_text()
    assert outside_scripts(page).count('src="data:image/png;base64,') == 8
    assert len(specs(page)) == 8  # the curves and the seven probe figures, interactive too
    # Issue 16, item 4: the probes were taken with the training loss, so the backward predictions (made for a unit
    # gradient at the output) are drawn times E[g²] measured at the output, in the PNG and on the page, and the
    # panel says so.
    (fig,) = drawn
    (depth,) = [sp for sp in specs(page) if any(t.get("meta") == "predicted-backward" for t in sp["data"])]
    for method, g2 in HEAD_GRAD.items():
        f = frames[method]
        pred = f.loc[(f["quantity"] == "output") & f["kind"].isin(["conv2d", "linear"]), "pred_in_grad_var"].to_numpy()
        (line,) = [a for ax in fig.axes for a in ax.get_lines() if a.get_gid() == f"predicted-backward|{method}"]
        assert line.get_ydata() == pytest.approx(pred * g2)
        (trace,) = [t for t in depth["data"] if t.get("meta") == "predicted-backward" and t["legendgroup"] == method]
        assert trace["y"] == pytest.approx(list(pred * g2))
    assert "× E[g²] measured at the output" in fig.axes[1].get_title()
    assert any("× E[g²] measured at the output" in a["text"] for a in depth["layout"]["annotations"])


def test_only_failed_runs(tmp_path):
    db = tmp_path / "f.db"
    with Store(db) as s:
        s.claim("a", cfg("A", "xavier", "adam", 1e-3, 0))
        s.fail("a", "Traceback (most recent call last):\nValueError: bad")
    rep = rp.write_report(db, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    # said once, not under the heading of every table that has no value (issue 16, item 5)
    assert md.count("No finished or diverged runs yet.") == 1 and "1 run in the database: 0 finished" in md
    assert page.count("No finished or diverged runs yet.") == 1 and "<h2>Table" not in page and "## Table" not in md
    assert "`a`: ValueError: bad" in md and not rep.figures
    assert "plotly.js v" not in page  # no figure: no plotly.js either


def test_a_table_of_dashes_is_no_section(tmp_path):
    # Issue 16, item 5: runs that recorded no test metrics gave the Glorot/He table (and the accuracy table) as
    # sections of "–" cells. A table with no value is left off the pages; its CSV is still written.
    db = tmp_path / "n.db"
    with Store(db) as s:
        for i, method in enumerate(("xavier", "kaiming-forward")):
            s.claim(f"r{i}", cfg("A", method, "sgd", 1e-2, 0))
            s.finish(SimpleNamespace(run_id=f"r{i}", status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}],
                best_epoch=1, test={}, diverged_epoch=None, error=None, checkpoint=None))
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Table 1 (Glorot/He paper)" not in md and "Table 1 (Glorot/He paper)" not in page
    assert "Test accuracy (%)" not in md and "| – |" not in md and "<td>–</td>" not in page
    assert [t.has_values for t in rep.tables] == [False, False]
    assert "No table has a value: the runs recorded no test metrics" in md
    assert (tmp_path / "out" / "table_model_method_test.csv").is_file()


def test_a_glorot_he_page_has_its_own_table_only(tmp_path):
    # Issue 16, item 5: on a grid of models × methods (the Glorot/He paper's), the poster-form pivot repeated the
    # Glorot/He table's accuracy column cell for cell. The pages show the Glorot/He table; the pivot's CSV stays.
    db = tmp_path / "gh.db"
    with Store(db) as s:
        grid = itertools.product(("mobilenet_v2", "resnet18"), ("xavier", "kaiming-forward"))
        for i, (model, method) in enumerate(grid):
            s.claim(f"r{i}", {**cfg("A", method, "sgd", 1e-2, 0), "model": model})
            s.finish(SimpleNamespace(run_id=f"r{i}", status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}],
                best_epoch=1, test={m: 0.4 + 0.1 * i for m in rp.METRICS}, diverged_epoch=None, error=None,
                checkpoint=None))
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert [t.key for t in rep.tables] == ["table_model_method", "table_model_method_test"]
    for text in (md, page):
        assert "Table 1 (Glorot/He paper)" in text and "Test accuracy (%) by model" not in text
    assert "| resnet18, kaiming-forward (n=1) | ≈ 70.00 |" in md
    assert (tmp_path / "out" / "table_model_method.csv").is_file()
    # one model (the poster's grids): the pivot is the poster's table, shown beside the Glorot/He one
    one = rp.write_report(db, tmp_path / "one", figures=False, where={"model": ["resnet18"]})
    md = (tmp_path / "one" / "report.md").read_text()
    assert [t.key for t in one.tables] == ["table1_dataset_method", "table_model_method_test"]
    assert "## Test accuracy (%) by " in md and "## Table 1 (Glorot/He paper)" in md


# -- user-supplied text in every output format (issue 14, item 9) -----------------------------------------


XSS = "<script>alert(1)</script>"


def test_html_and_markdown_in_titles_names_and_paths_are_text_in_every_format(tmp_path):
    # The repro: a --title, a sweep name or a folder path holding <script>…</script> landed raw in report.md
    # (the HTML page escaped them).
    from typer.testing import CliRunner

    from initscope.cli import app
    from initscope.experiments.tables.papers import md_code, md_text

    db = tmp_path / "x.db"
    data = f"folder:/data/{XSS}/[a](javascript:x)|*b*"
    with Store(db) as s:
        s.add_sweep("s1", f"{XSS} `tick`", {"grid": {"data": [data]}, "run": {"epochs": 1}}, ["r1", "r2"])
        for i, method in enumerate(("xavier", "asv-backward")):
            c = {**cfg("A", method, "adam", 1e-3, 0), "data": data}
            s.claim(f"r{i + 1}", c)
            s.finish(SimpleNamespace(run_id=f"r{i + 1}", status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5 + i / 10}],
                best_epoch=1, test={"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "loss": 1.0},
                diverged_epoch=None, error=None, checkpoint=None))
        s.claim("r3", {**cfg("A", "xavier", "sgd", 1e-3, 0), "data": data})
        s.fail("r3", f"Traceback ...\nValueError: bad {XSS}")
    r = CliRunner().invoke(app, ["report", str(db), "--out", str(tmp_path / "rep"), "--title", f"Results {XSS}"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    # The page's own scripts (plotly.js, its drawing script, the figures' JSON) are the only script elements;
    # the user's text is escaped in the markup and inside the figures' JSON alike.
    assert "<script>" not in md and XSS not in page and "alert(1)</script>" not in page
    markup = outside_scripts(page)
    assert "<script" not in markup
    assert "[a](javascript" not in md and "\\[a\\](javascript:x)" in md  # no link: its brackets escaped
    assert all(href.startswith("figures/") for href in re.findall(r'href="([^"]*)"', markup))
    texts = [t for spec in specs(page) for t in strings(spec) if "alert(1)" in t]
    assert texts and all("<script>" not in t and "&lt;script&gt;" in t for t in texts)
    assert f"# Results {md_text(XSS)}" in md  # the title, escaped, still readable
    assert md_code(f"{XSS} `tick`") in md  # the sweep name as literal code
    assert md_text(data) in md  # the folder path, in the summary and the tables
    assert f"ValueError: bad {md_text(XSS)}" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the escapes themselves: nothing that Markdown or HTML would read is left
    assert md_text("a<b>&[c](d)|`e`*f*_g_#h") == "a&lt;b&gt;&amp;\\[c\\](d)\\|\\`e\\`\\*f\\*\\_g\\_\\#h"
    assert md_code("a1b2") == "`a1b2`" and md_code("<b>`x`") == "&lt;b&gt;\\`x\\`"


# -- intervals, ties and winners on a hand-built database (issue 15, item 6) ----------------------------------


def _finish(s, config, val, test_acc, *, status="finished", history=None):
    from initscope.experiments.config import RunConfig

    c = RunConfig(**config)
    s.claim(c.run_id, c.to_dict())
    hist = history or [{"epoch": 1, "train_loss": 1.0, "val_accuracy": val}]
    s.finish(SimpleNamespace(run_id=c.run_id, status=status, history=hist, best_epoch=1,
                             test={"accuracy": test_acc, "precision": test_acc, "recall": test_acc, "f1": test_acc,
                                   "loss": 1 - test_acc}, diverged_epoch=None, error=None, checkpoint=None))
    return c


HAND = {  # setting -> method -> test accuracies (%) over seeds
    "clear": {"xavier": [80, 81, 79, 80, 80], "kaiming-forward": [60, 61, 59, 60, 60]},
    "tie": {"xavier": [70, 75, 65], "kaiming-forward": [69, 74, 64]},
    "single": {"xavier": [70], "kaiming-forward": [60]},
}


@pytest.fixture
def hand_db(tmp_path):
    db = tmp_path / "hand.db"
    with Store(db) as s:
        for width, setting in zip((4, 5, 6), HAND):
            for method, values in HAND[setting].items():
                for seed, v in enumerate(values):
                    _finish(s, dict(data="synthetic", width=width, method=method, lr=1e-3, seed=seed), v / 100,
                            v / 100)
    return db


def test_intervals_ties_and_a_clear_winner(hand_db, tmp_path):
    t = rp.accuracy_table(rp.load_runs(hand_db))
    assert list(t.columns[:2]) == ["width", "method"]  # width varies: one row per width, never averaged
    by = {(r["width"], r["method"]): r for r in t.to_dict("records")}
    for width, setting in zip((4, 5, 6), HAND):
        for method, values in HAND[setting].items():
            r = by[(width, method)]
            assert r["mean"] == pytest.approx(statistics.mean(values)) and r["n"] == len(values)
            if len(values) > 1:
                lo, hi = t_interval(values)
                assert r["ci_low"] == pytest.approx(lo) and r["ci_high"] == pytest.approx(hi)
                assert r["std"] == pytest.approx(statistics.stdev(values))
            else:
                assert math.isnan(r["ci_low"]) and math.isnan(r["std"])
    # 80 +- 0.9 against 60 +- 0.9: a winner; 70 +- 12 against 69 +- 12: a tie; one seed each: no interval, a tie
    assert by[(4, "xavier")]["mark"] == "best" and by[(4, "kaiming-forward")]["mark"] == ""
    assert by[(5, "xavier")]["mark"] == by[(5, "kaiming-forward")]["mark"] == "tie"
    assert by[(6, "xavier")]["mark"] == by[(6, "kaiming-forward")]["mark"] == "tie"
    rep = rp.write_report(hand_db, tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| **80.00 ± 0.71 (n=5; CI 79.12–80.88)** | 60.00 ± 0.71 (n=5; CI 59.12–60.88) |" in md
    assert "| ≈ 70.00 ± 5.00 (n=3; CI 57.58–82.42) | ≈ 69.00 ± 5.00 (n=3; CI 56.58–81.42) |" in md
    assert "| ≈ 70.00 (n=1) | ≈ 60.00 (n=1) |" in md
    assert "95 % t interval" in md and "Bold: the best per row, its interval overlapping no other's" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<b>80.00 ± 0.71 (n=5; CI 79.12–80.88)</b>" in page and "<b>69.00" not in page
    metrics = rep.table("table_model_method_test").data
    assert metrics.loc[metrics["width"] == 4, "loss_mark"].tolist() == ["best", ""]  # the lowest loss wins


def test_marks_compare_intervals():
    Stat = rp.Stat
    a, b = Stat.of([10, 11, 12]), Stat.of([20, 21, 22])
    assert rp.marks({"a": a, "b": b}) == {"a": "", "b": "best"}
    assert rp.marks({"a": a, "b": b}, higher_is_better=False) == {"a": "best", "b": ""}
    wide = Stat.of([0, 40])
    assert rp.marks({"a": a, "b": b, "w": wide}) == {"a": "", "b": "tie", "w": "tie"}
    assert rp.marks({"a": a, "none": Stat.of([])}) == {"a": "", "none": ""}  # one cell with a value: nothing to beat
    assert rp.marks({"a": Stat.of([5])}) == {"a": ""}
    assert rp.marks({"a": Stat.of([5]), "b": Stat.of([3])}) == {"a": "tie", "b": "tie"}  # no interval: no verdict


def test_selection_runs_are_left_out_and_shown_apart(tmp_path):
    from initscope.experiments.config.select import Select

    db = tmp_path / "sel.db"
    base = dict(data="synthetic", method="xavier")
    with Store(db) as s:
        for lr, val in ((1e-3, 0.6), (1e-2, 0.5)):
            _finish(s, {**base, "lr": lr, "seed": 0}, val, 0.99 if lr == 1e-2 else 0.55)  # 1e-2: great on test
        for seed in (1, 2):
            _finish(s, {**base, "lr": 1e-3, "seed": seed}, 0.6, 0.5 + seed / 100)
        _finish(s, {**base, "method": "kaiming-forward", "lr": 1e-3, "seed": 0}, 0.4, 0.4)
        from initscope.experiments.config import RunConfig

        select = Select("lr", (0, 1, 2))
        cand = RunConfig(**base, lr=1e-3)
        s.decide(select.group_id(cand, [1e-3, 1e-2]), axis="lr", by=select.by, group=select.group(cand), chosen=1e-3,
                 scores=[{"value": 1e-3, "score": 0.6}, {"value": 1e-2, "score": 0.5}], sweep_id="s")
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    t = rep.table("table1_dataset_method").data
    xav = t[t["method"] == "xavier"].iloc[0]
    assert xav["n"] == 3 and xav["mean"] == pytest.approx(statistics.mean([55, 51, 52]))  # never the 99 at 1e-2
    sel = rep.table("selection").data
    # 1e-3 is the grid's smallest value and beat its neighbour: the best rate may lie below the grid
    assert sel.to_dict("records") == [{"axis": "lr", "0.001": 60.0, "0.01": 50.0, "chosen": "0.001", "edge": "bottom"}]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| all runs | **60.00** | 50.00 | ⇥ bottom |" in md and "lr chosen on validation" in md


def test_a_report_restricted_by_where_keeps_only_its_own_choices(tmp_path):
    # The poster's Tables 1 and 2 share a database: plain34's learning rates were chosen apart from
    # plain50's. `--where model=plain34` listed (and applied) both models' choices.
    from initscope.experiments.config import RunConfig
    from initscope.experiments.config.select import Select

    db = tmp_path / "two.db"
    select = Select("lr", (0, 1))
    with Store(db) as s:
        for model, best in (("plain34", 1e-3), ("plain50", 1e-2)):
            base = dict(data="synthetic", method="xavier", model=model)
            for lr in (1e-3, 1e-2):
                _finish(s, {**base, "lr": lr, "seed": 0}, 0.6 if lr == best else 0.4, 0.5)
            _finish(s, {**base, "lr": best, "seed": 1}, 0.6, 0.5)
            cand = RunConfig(**base, lr=best)
            s.decide(select.group_id(cand, [1e-3, 1e-2]), axis="lr", by=select.by, group=select.group(cand),
                     chosen=best, scores=[{"value": lr, "score": 0.6 if lr == best else 0.4} for lr in (1e-3, 1e-2)],
                     sweep_id="s")
    rep = rp.write_report(db, tmp_path / "out", figures=False, where={"model": ["plain34"]})
    sel = rep.table("selection").data
    assert sel["chosen"].tolist() == ["0.001"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "in 1 group(s)" in md
    both = rp.write_report(db, tmp_path / "all", figures=False)
    assert sorted(both.table("selection").data["chosen"].tolist()) == ["0.001", "0.01"]

    # a second sweep queued in the same database (plain50 at two more seeds, not started): the plain34
    # report does not count its queue, the whole database's does
    present = rp.load_runs(db)
    with Store(db) as s:
        s.add_sweep("t1", "table1", {"grid": {}, "run": {}}, list(present.loc[present["cfg_model"] == "plain34", "run_id"]))
        s.add_sweep("t2", "table2", {"grid": {}, "run": {}}, ["queued-a", "queued-b"]
                    + list(present.loc[present["cfg_model"] == "plain50", "run_id"]))
    plain34 = rp.write_report(db, tmp_path / "p34", figures=False, where={"model": ["plain34"]})
    assert "not started" not in (tmp_path / "p34" / "report.md").read_text()
    rp.write_report(db, tmp_path / "all2", figures=False)
    assert "2 of the sweeps' runs not started yet" in (tmp_path / "all2" / "report.md").read_text()
    assert plain34.summary["not_started"] == 0


def test_method_variants_and_the_accuracy_after_an_epoch(tmp_path):
    db = tmp_path / "v.db"
    with Store(db) as s:
        for depth, residual, accs in (("resnet20", "scale", (0.5, 0.7)), ("resnet20", "zero", (0.4, 0.8)),
                                      ("resnet56", "scale", (0.3, 0.6))):
            for seed in (0, 1):
                hist = [{"epoch": e, "train_loss": 1.0, "val_accuracy": a, "test_accuracy": a + seed / 100}
                        for e, a in ((1, accs[0]), (2, accs[1]))]
                _finish(s, dict(data="synthetic", model=depth, norm="none", method="asv-backward", residual=residual,
                                seed=seed, test_at=[1, 2], epochs=2), accs[1], accs[1], history=hist)
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    assert [t.key for t in rep.tables] == ["table_model_method", "table_model_method_test", "table_epoch1_test",
                                           "table_epoch2_test"]
    e1 = rep.table("table_epoch1_test").data
    assert set(e1["method"]) == {"asv-backward (residual=scale)", "asv-backward (residual=zero)"}
    r = e1[(e1["model"] == "resnet20") & (e1["method"] == "asv-backward (residual=zero)")].iloc[0]
    assert r["mean"] == pytest.approx(40.5) and r["n"] == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Test accuracy (%) after epoch 1" in md and "initialization: asv-backward; residual scale, zero" in md


def test_the_page_says_what_was_run(tmp_path):
    db = tmp_path / "p.db"
    with Store(db) as s:
        for seed in (0, 1):
            c = _finish(s, dict(data="synthetic", augment="crop-flip", patience=5, epochs=30, image_size=24,
                                seed=seed), 0.5, 0.5)
            s.conn.execute("UPDATE runs SET stopped_epoch=12, cpu_seconds=3600, wall_seconds=1800, device='cpu', "
                           "threads=1 WHERE run_id=?", (c.run_id,))
    rp.write_report(db, tmp_path / "out", figures=False)
    md = (tmp_path / "out" / "report.md").read_text()
    for text in ("data: synthetic: 60/20/20 per class", "resolution: 24×24", "augmentation: crop-flip",
                 "at most 30 epochs", "after 5 epochs without a better one", "2 of 2 runs stopped early (epochs 12-12",
                 "seeds: 0, 1", "device: cpu (2 runs); torch threads per run: 1", "CPU time: 2.00 h over 2 runs"):
        assert text in md, text


def test_accuracy_against_depth(tmp_path):
    # Issue 15's depth question: one line per method against the nets' weight layers, at each test_at epoch.
    path = tmp_path / "depth.db"

    def acc(model, method, epoch, seed):
        return 0.2 + (0.3 if method == "fixup" else 0.0) + (0.1 if model == "resnet20" else 0.0) + 0.1 * epoch + 0.01 * seed

    keys = list(itertools.product(("resnet20", "resnet56"), ("fixup", "kaiming-forward"), SEEDS))
    with Store(path) as s:
        s.add_sweep("d", "depth", {"grid": {}, "run": {}}, [rid(*k) for k in keys])
        for model, method, seed in keys:
            config = {"data": "A", "model": model, "method": method, "optimizer": "adam", "lr": 1e-3, "seed": seed,
                      "epochs": 2, "width": 16, "norm": "none", "test_at": [1, 2], "device": "auto"}
            s.claim(rid(model, method, seed), config)
            history = [{"epoch": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                        "lr": 1e-3, "seconds": 1.0, "test_accuracy": acc(model, method, e, seed), "test_loss": 1.0}
                       for e in (1, 2)]
            s.finish(SimpleNamespace(run_id=rid(model, method, seed), status="finished", history=history, best_epoch=2,
                                     test={m: 0.5 for m in rp.METRICS}, diverged_epoch=None, error=None,
                                     checkpoint=None))
    table = rp.papers.depth_table(rp.load_runs(path), rp.load_epochs(path))
    assert sorted(table["depth"].unique()) == [20, 56]  # the CIFAR ResNets' 6n + 2 weight layers
    cell = table[(table["method"] == "fixup") & (table["model"] == "resnet56") & (table["epoch"] == 2)].iloc[0]
    values = [100 * acc("resnet56", "fixup", 2, s) for s in SEEDS]
    assert cell["mean"] == pytest.approx(statistics.mean(values)) and cell["n"] == 3
    assert cell["low"] < cell["mean"] < cell["high"]
    rep = rp.write_report(path, tmp_path / "r")
    assert (tmp_path / "r" / "figures" / "accuracy_vs_depth.png").exists()
    assert "accuracy_vs_depth.png" in (tmp_path / "r" / "report.md").read_text()

    from initscope.plotting.depth_accuracy import plot_accuracy_vs_depth

    fig = plot_accuracy_vs_depth(table)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["after epoch 1", "after epoch 2"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["20", "56"] and axes[0].get_xscale() == "log"
    assert len(axes[1].get_legend().get_texts()) == 2
    assert rep.figures


@pytest.mark.parametrize("models, batches", [(("mobilenet_v1", "resnet50"), (32, 32)),
                                              (("resnet20", "resnet56"), (128, 32))])
def test_no_depth_figure_across_families_or_protocols(tmp_path, models, batches):
    # The Glorot/He study trains MobileNet v1 at batch 128 and ResNet-50 at batch 32: a line from one
    # to the other against depth draws architecture and protocol as depth. Nor do two depths of one
    # family trained two ways make a depth comparison.
    path = tmp_path / "two.db"
    keys = list(itertools.product(zip(models, batches), ("xavier", "kaiming-forward"), SEEDS))
    with Store(path) as s:
        s.add_sweep("g", "g", {"grid": {}, "run": {}}, [rid(m, meth, seed) for (m, _), meth, seed in keys])
        for (model, batch), method, seed in keys:
            config = {"data": "A", "model": model, "method": method, "optimizer": "sgd", "lr": 1e-2, "seed": seed,
                      "epochs": 1, "batch_size": batch, "device": "auto"}
            s.claim(rid(model, method, seed), config)
            history = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                        "lr": 1e-2, "seconds": 1.0}]
            s.finish(SimpleNamespace(run_id=rid(model, method, seed), status="finished", history=history, best_epoch=1,
                                     test={m: 0.5 for m in rp.METRICS}, diverged_epoch=None, error=None,
                                     checkpoint=None))
    assert rp.papers.depth_table(rp.load_runs(path), rp.load_epochs(path)).empty
    rp.write_report(path, tmp_path / "r")
    assert not (tmp_path / "r" / "figures" / "accuracy_vs_depth.png").exists()


def test_accuracy_against_depth_on_the_page(tmp_path):
    from initscope.plotting import web

    table = pd.DataFrame([{"method": m, "model": f"resnet{d}", "depth": d, "epoch": e, "mean": 50.0 + d / 10,
                           "std": 1.0, "n": 3, "low": 48.0 + d / 10, "high": 52.0 + d / 10}
                          for m in ("fixup", "kaiming-forward") for d in (20, 56, 110) for e in (1, 5)])
    spec = web.depth_accuracy_figure(table)
    assert len(spec["data"]) == 4 and spec["layout"]["xaxis"]["type"] == "log"
    trace = spec["data"][0]
    assert trace["x"] == [20, 56, 110] and trace["error_y"]["array"] == pytest.approx([2.0, 2.0, 2.0])
    assert "weight layers" in trace["hovertemplate"] and trace["customdata"][0][0] == "resnet20"


def test_curves_keep_runs_without_a_plan_option_and_name_its_variants(tmp_path):
    # A sweep where only some runs set residual (the depth campaign): grouping by it dropped every run that
    # left it unset (pandas drops NaN keys), and the variants were figures of their own instead of lines.
    from initscope.experiments.tables.results import _curve_frames

    path = tmp_path / "v.db"
    with Store(path) as s:
        s.add_sweep("v", "v", {"grid": {}, "run": {}}, ["a", "b", "c"])
        for rid_, method, residual in (("a", "fixup", None), ("b", "asv-backward", "zero"), ("c", "asv-backward", "scale")):
            config = {**cfg("A", method, "adam", 1e-3, 0), **({"residual": residual} if residual else {})}
            s.claim(rid_, config)
            s.finish(SimpleNamespace(run_id=rid_, status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}],
                best_epoch=1, test={m: 0.5 for m in rp.METRICS}, diverged_epoch=None, error=None, checkpoint=None))
    ((name, frame, n),) = _curve_frames(rp.load_runs(path), rp.load_epochs(path))
    assert set(frame["label"]) == {"fixup", "asv-backward (residual=zero)", "asv-backward (residual=scale)"}
