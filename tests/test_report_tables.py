"""The report's tables from a database whose every number is known, checked against a direct computation."""

import itertools
import math
import statistics
from types import SimpleNamespace

import pandas as pd
import pytest

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


@pytest.mark.parametrize("rows", ["data", "optimizer"])
def test_accuracy_tables_match_direct_computation(db, rows):
    runs = rp.load_runs(db)
    table = rp.accuracy_table(runs, rows, "method")
    row_values = DATA if rows == "data" else OPTS
    assert len(table) == len(row_values) * len(METHODS)
    # methods in the papers' order (xavier before asv-backward), rows in order of appearance
    assert list(table["method"][:2]) == ["xavier", "asv-backward"]
    assert list(dict.fromkeys(table[rows])) == list(row_values)
    for r in table.to_dict("records"):
        mean, std, setting = expected_cell([rows, "method"], [r[rows], r["method"]],
                                           lambda *k: 100 * best_val(*k))
        assert r["mean"] == pytest.approx(mean, abs=1e-9) and r["std"] == pytest.approx(std, abs=1e-9)
        assert r["n"] == 3 and r["n_diverged"] == 0
        for k, v in setting.items():
            assert f"{k}={v}" in r["setting"]
    # best per row is asv-backward (it adds 0.05 everywhere)
    assert set(table[table["best"]]["method"]) == {"asv-backward"}
    assert table.groupby(rows)["best"].sum().eq(1).all()


def test_test_metrics_table_matches_direct_computation(db):
    runs = rp.load_runs(db)
    table = rp.test_metrics_table(runs, ("model", "method"))
    assert list(table["method"]) == ["xavier", "asv-backward"]
    for r in table.to_dict("records"):
        for m in rp.METRICS:
            mean, std, _ = expected_cell(["model", "method"], ["plain34", r["method"]],
                                         lambda d, me, o, lr, s, m=m: test_metric(d, me, o, lr, s, m))
            assert r[f"{m}_mean"] == pytest.approx(mean, abs=1e-12)
            assert r[f"{m}_std"] == pytest.approx(std, abs=1e-12)
    # higher accuracy and higher loss both belong to asv-backward here: bold must follow the direction
    asv = table[table["method"] == "asv-backward"].iloc[0]
    xav = table[table["method"] == "xavier"].iloc[0]
    assert asv["accuracy_best"] and not xav["accuracy_best"]
    assert xav["loss_best"] and not asv["loss_best"]


def test_written_report(db, tmp_path):
    rep = rp.write_report(db, tmp_path / "out", title="known")
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    t1 = rep.table("table1_dataset_method").data
    cell = t1[(t1["data"] == "A") & (t1["method"] == "asv-backward")].iloc[0]
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    # the bold cell in Markdown and HTML, the plain one not bold
    assert f"**{text}**" in md and f"<b>{text}</b>" in page
    other = t1[(t1["data"] == "A") & (t1["method"] == "xavier")].iloc[0]
    plain = f"{other['mean']:.2f} ± {other['std']:.2f}"
    assert f"| {plain} |" in md and f"<b>{plain}</b>" not in page
    # the CSV is the long table, numbers intact
    back = pd.read_csv(tmp_path / "out" / "table1_dataset_method.csv")
    assert back["mean"].to_numpy() == pytest.approx(t1["mean"].to_numpy())
    runs_csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs_csv) == 2 * 2 * 2 * 2 * 3 + 2 and {"method", "lr", "status", "test_f1"} <= set(runs_csv.columns)
    # what was run: counts by status, the grid, the failure's message, the run not started
    assert "48 finished, 0 diverged, 1 failed, 1 running" in md
    assert "1 of the sweeps' runs not started yet" in md
    assert "RuntimeError: out of memory" in md and "RuntimeError: out of memory" in page
    assert "method: asv-backward, xavier" in md
    # curves: one figure per (data, optimizer, lr) group, embedded in the page
    assert len(rep.figures) == 8 and all(p.is_file() for _, p in rep.figures)
    assert page.count("data:image/png;base64,") == 8
    assert "src=\"figures/" not in page  # self-contained


def test_diverged_runs_count_with_what_they_reached(tmp_path):
    db = tmp_path / "d.db"
    with Store(db) as s:
        for seed, (status, vals) in enumerate((("finished", [0.5, 0.6]), ("diverged", [0.3]),
                                               ("diverged", []))):
            key = ("A", "xavier", "adam", 1e-3, seed)
            s.claim(rid(*key), cfg(*key))
            hist = [{"epoch": e + 1, "val_accuracy": v, "train_loss": 1.0} for e, v in enumerate(vals)]
            s.finish(SimpleNamespace(run_id=rid(*key), status=status, history=hist,
                                     best_epoch=len(vals) or None, test={}, diverged_epoch=len(vals) + 1,
                                     error=None, checkpoint=None))
    t = rp.accuracy_table(rp.load_runs(db), "data", "method")
    (r,) = t.to_dict("records")
    assert r["n"] == 2 and r["n_diverged"] == 2  # the run diverged in epoch 1 has no value
    assert r["mean"] == pytest.approx(45.0) and r["std"] == pytest.approx(statistics.stdev([60.0, 30.0]))
    rep = rp.write_report(db, tmp_path / "out", figures=False)
    assert "45.00 ± 21.21 (2 div.)" in (tmp_path / "out" / "report.md").read_text()
    assert not math.isnan(rep.summary["train_seconds"])


def test_missing_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results database"):
        rp.load_runs(tmp_path / "nope.db")


def test_where_restricts_the_tables(db, tmp_path):
    rep = rp.write_report(db, tmp_path / "w", figures=False, where={"optimizer": ["adam"], "lr": ["0.001"]})
    t3 = rep.table("table3_optimizer_method").data
    assert list(t3["optimizer"].unique()) == ["adam"] and set(t3["setting"]) == {"data=B"}
    cell = t3[t3["method"] == "xavier"].iloc[0]
    values = [100 * best_val("A", "xavier", "adam", 1e-3, s) for s in SEEDS] + \
             [100 * best_val("B", "xavier", "adam", 1e-3, s) for s in SEEDS]
    # data still varies: the cell takes the better dataset (B) by mean validation accuracy
    assert cell["mean"] == pytest.approx(statistics.mean(values[3:]))
    md = (tmp_path / "w" / "report.md").read_text()
    assert "Only the runs with optimizer in adam; lr in 0.001" in md and "14 runs in the database" in md
    with pytest.raises(ValueError, match="where: unknown key 'optimiser'; valid: .*optimizer"):
        rp.write_report(db, tmp_path / "w2", where={"optimiser": ["adam"]})


def test_probe_frames_become_figures(tmp_path):
    from probe_frames import make_frame

    db = tmp_path / "p.db"
    with Store(db) as s:
        for method in ("xavier", "asv-backward"):
            key = ("A", method, "adam", 1e-3, 0)
            run_dir = tmp_path / "runs" / rid(*key)
            run_dir.mkdir(parents=True)
            init = make_frame(methods=(method,)).drop(columns=["method"]).assign(step=0)
            later = init.assign(step=50, layer="later." + init["layer"])  # a second probe, after training
            pd.concat([init, later]).to_parquet(run_dir / "probe.parquet")
            s.claim(rid(*key), cfg(*key))
            s.set_run_dir(rid(*key), run_dir)
            s.finish(SimpleNamespace(run_id=rid(*key), status="finished", history=[
                {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}],
                best_epoch=1, test={}, diverged_epoch=None, error=None, checkpoint=None))
    ((name, frame),) = _probe_frames(rp.load_runs(db))
    assert name == "A · plain34" and set(frame["method"]) == {"xavier", "asv-backward"}
    assert set(frame["step"]) == {0} and not frame["layer"].str.startswith("later.").any()
    rep = rp.write_report(db, tmp_path / "out")
    probes = [p for _, p in rep.figures if p.name.startswith("probe_")]
    assert sorted(p.name.split("_")[1] for p in probes) == ["activation", "depth", "gradient"]
    assert all(p.is_file() for p in probes)
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") == 4


def test_only_failed_runs(tmp_path):
    db = tmp_path / "f.db"
    with Store(db) as s:
        s.claim("a", cfg("A", "xavier", "adam", 1e-3, 0))
        s.fail("a", "Traceback (most recent call last):\nValueError: bad")
    rep = rp.write_report(db, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("No finished or diverged runs yet.") == 3 and "1 run in the database: 0 finished" in md
    assert "`a`: ValueError: bad" in md and not rep.figures


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
    assert "<script>" not in md and "<script>" not in page
    assert "[a](javascript" not in md and "\\[a\\](javascript:x)" in md  # no link: its brackets escaped
    assert "href=" not in page
    assert f"# Results {md_text(XSS)}" in md  # the title, escaped, still readable
    assert md_code(f"{XSS} `tick`") in md  # the sweep name as literal code
    assert md_text(data) in md  # the folder path, in the summary and the tables
    assert f"ValueError: bad {md_text(XSS)}" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the escapes themselves: nothing that Markdown or HTML would read is left
    assert md_text("a<b>&[c](d)|`e`*f*_g_#h") == "a&lt;b&gt;&amp;\\[c\\](d)\\|\\`e\\`\\*f\\*\\_g\\_\\#h"
    assert md_code("a1b2") == "`a1b2`" and md_code("<b>`x`") == "&lt;b&gt;\\`x\\`"
