"""The protocol of issue 15 as a sweep feature: ``[select]`` chooses the learning rate per group on validation
from the first seed's runs, then runs the other seeds at the choice; recorded, resumable, shared between
sweeps, shown by ``--dry-run``; and ``--parallel`` running several single-thread runs side by side."""

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import ConfigError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.config.select import Select
from initscope.experiments.engines import run_sweep
from initscope.experiments.store import Store
from initscope.experiments.training import RunResult

# each method's best learning rate; a run's validation accuracy falls with the decades away from it
BEST_LR = {"xavier": 1e-3, "kaiming-forward": 1e-2, "asv-backward": 1e-4}


def fake_train(config, *, out_dir=None, progress=False, on_epoch=None, resume=True):
    """A stand-in for train(): validation accuracy peaks at the method's best lr; seeds add a little; a
    module-level function, so that --parallel's worker processes can receive it."""
    if config.method == "lsuv" and config.seed == 0 and config.lr == 1e-3:
        raise RuntimeError("boom")
    acc = 0.8 - 0.1 * abs(math.log10(config.lr) - math.log10(BEST_LR.get(config.method, 1e-3))) + 0.01 * config.seed
    history = [{"epoch": e, "train_loss": 1.0, "train_accuracy": acc, "val_loss": 1.0, "val_accuracy": acc * e / 2,
                "lr": config.lr, "seconds": 0.01} for e in (1, 2)]
    for row in history:
        if on_epoch is not None:
            on_epoch(dict(row))
    return RunResult(run_id=config.run_id, config=config, status="finished", history=history, best_epoch=2,
                     test={"accuracy": acc - 0.05, "precision": acc, "recall": acc, "f1": acc, "loss": 1 - acc},
                     wall_seconds=0.02, cpu_seconds=0.02, device="cpu", threads=1)


def doc(tmp_path, methods=("xavier", "kaiming-forward", "asv-backward"), seeds=(0, 1, 2)):
    return {"name": "sel", "db": str(tmp_path / "r.db"), "out": str(tmp_path / "runs"),
            "grid": {"data": ["synthetic"], "method": list(methods), "lr": [1e-4, 1e-3, 1e-2]},
            "run": {"epochs": 2, "width": 4},
            "select": {"axis": "lr", "by": "best validation accuracy", "seeds": list(seeds)}}


def test_the_grid_runs_at_the_first_seed_then_the_other_seeds_at_each_choice(tmp_path):
    sweep = SweepConfig.from_mapping(doc(tmp_path))
    assert len(sweep.expand()) == 9 and {r.seed for r in sweep.expand()} == {0}
    summary = run_sweep(sweep, train_fn=fake_train, progress=False)
    assert summary.ran == {"finished": 9 + 3 * 2} and summary.total == 15 and not summary.waiting_groups
    with Store(sweep.db) as s:
        chosen = {sel["group"]["method"]: sel["chosen"] for sel in s.selections()}
        assert chosen == BEST_LR
        for sel in s.selections():
            assert sel["axis"] == "lr" and [c["value"] for c in sel["scores"]] == [1e-4, 1e-3, 1e-2]
        runs = s.runs()
        for method, lr in BEST_LR.items():
            at_choice = [r for r in runs if r["method"] == method and r["lr"] == lr]
            assert sorted(r["seed"] for r in at_choice) == [0, 1, 2]
            others = [r for r in runs if r["method"] == method and r["lr"] != lr]
            assert sorted(r["seed"] for r in others) == [0, 0]  # selection runs only
        assert len(s.sweeps()[0]["run_ids"]) == 15  # the runs after the choice are added to the sweep's record
    again = run_sweep(sweep, train_fn=fake_train, progress=False)
    assert again.skipped == {"finished": 15} and not again.ran


def test_a_failed_selection_run_leaves_its_group_undecided(tmp_path):
    sweep = SweepConfig.from_mapping(doc(tmp_path, methods=("xavier", "lsuv")))
    summary = run_sweep(sweep, train_fn=fake_train, progress=False, retry_failed=False)
    assert summary.ran == {"finished": 5 + 2, "failed": 1} and summary.waiting_groups == 1
    assert "1 selection group(s) undecided" in summary.line()
    with Store(sweep.db) as s:
        assert [sel["group"]["method"] for sel in s.selections()] == ["xavier"]


def test_choices_are_shared_by_groups_of_another_sweep(tmp_path):
    first = SweepConfig.from_mapping(doc(tmp_path, methods=("xavier",)))
    run_sweep(first, train_fn=fake_train, progress=False)
    wider = SweepConfig.from_mapping(doc(tmp_path, methods=("xavier", "asv-backward"), seeds=(0, 1, 2, 3)))
    calls = []

    def counting(config, **kw):
        calls.append((config.method, config.lr, config.seed))
        return fake_train(config, **kw)

    run_sweep(wider, train_fn=counting, progress=False)
    assert [c for c in calls if c[0] == "xavier"] == [("xavier", 1e-3, 3)]  # only the new seed
    asv = {c for c in calls if c[0] == "asv-backward"}
    assert asv == {("asv-backward", lr, 0) for lr in (1e-4, 1e-3, 1e-2)} | {("asv-backward", 1e-4, s) for s in (1, 2, 3)}


def test_a_wider_grid_is_chosen_anew_and_its_choice_replaces_the_edge_one(tmp_path):
    # kaiming-forward's best rate, 1e-2, lies above the first grid: it chooses that grid's top, 1e-3
    from initscope.experiments import tables as rp
    from initscope.experiments.config.select import grid_edge

    narrow = {**doc(tmp_path, methods=("kaiming-forward", "asv-backward")), "grid": {
        "data": ["synthetic"], "method": ["kaiming-forward", "asv-backward"], "lr": [1e-4, 1e-3]}}
    run_sweep(SweepConfig.from_mapping(narrow), train_fn=fake_train, progress=False)
    with Store(narrow["db"]) as s:
        first = {sel["group"]["method"]: sel for sel in s.selections()}
    assert first["kaiming-forward"]["chosen"] == 1e-3 and grid_edge(first["kaiming-forward"]) == "top"
    assert first["asv-backward"]["chosen"] == 1e-4 and grid_edge(first["asv-backward"]) == "bottom"

    calls = []

    def counting(config, **kw):
        calls.append((config.method, config.lr, config.seed))
        return fake_train(config, **kw)

    wide = {**narrow, "grid": {**narrow["grid"], "lr": [1e-4, 1e-3, 1e-2, 1e-1]}}
    run_sweep(SweepConfig.from_mapping(wide), train_fn=counting, progress=False)
    # only the new values at the first seed, then the other seeds where the choice moved (kaiming: to 1e-2)
    assert sorted(calls) == sorted([(m, lr, 0) for m in ("kaiming-forward", "asv-backward") for lr in (1e-2, 1e-1)]
                                   + [("kaiming-forward", 1e-2, 1), ("kaiming-forward", 1e-2, 2)])
    report = rp.write_report(narrow["db"], tmp_path / "out", figures=False)
    sel = report.table("selection").data.set_index("method")
    assert sel.loc["kaiming-forward", "chosen"] == "0.01" and sel.loc["kaiming-forward", "edge"] == ""
    assert sel.loc["asv-backward", "chosen"] == "0.0001" and sel.loc["asv-backward", "edge"] == "bottom"
    assert len(sel) == 2  # one line per group: the latest choice
    cells = report.table("table1_dataset_method").data.set_index("method")
    assert cells.loc["kaiming-forward", "n"] == 3 and cells.loc["kaiming-forward", "setting"] == "lr=0.01"
    md = " ".join((tmp_path / "out" / "report.md").read_text().split())
    assert "| 0.0001 | 0.001 | 0.01 | 0.1 | grid edge |" in md  # the grids' values in order


def test_a_choice_at_the_edge_is_flagged_only_where_it_beat_its_neighbour():
    from initscope.experiments.config.select import grid_edge

    def sel(chosen, scores):
        return {"chosen": chosen, "scores": [{"value": v, "score": s} for v, s in scores]}

    assert grid_edge(sel(0.1, [(1e-3, 0.2), (1e-2, 0.3), (0.1, 0.4)])) == "top"
    assert grid_edge(sel(1e-3, [(0.1, 0.2), (1e-2, 0.3), (1e-3, 0.4)])) == "bottom"  # listed in any order
    assert grid_edge(sel(1e-2, [(1e-3, 0.2), (1e-2, 0.5), (0.1, 0.4)])) == ""
    assert grid_edge(sel(1e-3, [(1e-3, 0.1), (1e-2, 0.1), (0.1, 0.1)])) == ""  # all at chance: a tie, no verdict
    assert grid_edge(sel(0.1, [(1e-2, None), (0.1, 0.1)])) == "top"  # the neighbour diverged at once
    assert grid_edge(sel("sgd", [("adam", 0.1), ("sgd", 0.2)])) == ""  # not a numeric axis
    assert grid_edge(sel(1e-3, [(1e-3, 0.4)])) == ""


def test_select_is_checked():
    base = {"grid": {"method": ["xavier"], "lr": [1e-3, 1e-2]}}
    for select, message in [({"axis": "lr"}, "select: needs seeds"),
                            ({"axis": "width", "seeds": [0]}, "select: axis 'width' is not a \\[grid\\] key"),
                            ({"axis": "seed", "seeds": [0]}, "axis cannot be the seed"),
                            ({"axis": "lr", "seeds": [0], "by": "test accuracy"},
                             "select: by: unknown value 'test accuracy'; valid: 'best validation accuracy'"),
                            ({"axis": "lr", "seeds": []}, "seeds must be a non-empty list"),
                            ({"axis": "lr", "seeds": [0], "score": 1}, "select: unknown key\\(s\\) 'score'")]:
        with pytest.raises(ConfigError, match=message):
            SweepConfig.from_mapping({**base, "select": select})
    with pytest.raises(ConfigError, match="grid: seed is set by \\[select\\] seeds"):
        SweepConfig.from_mapping({"grid": {**base["grid"], "seed": [0, 1]}, "select": {"axis": "lr", "seeds": [0]}})
    sweep = SweepConfig.from_mapping({**base, "select": {"axis": "lrs", "seeds": [3, 4, 3]}})  # the flag's name too
    assert sweep.select == Select("lr", (3, 4)) and [r.seed for r in sweep.expand()] == [3, 3]
    assert sweep.sweep_id != SweepConfig.from_mapping(base).sweep_id
    flags = SweepConfig.from_flags(grid={"seed": "7,8"}, fixed={})
    sweep.override(flags)  # --seeds replaces the protocol's seeds
    assert sweep.select.seeds == (7, 8) and "seed" not in sweep.grid


def test_groups_are_the_settings_but_the_axis_and_the_seed():
    select = Select("lr", (0, 1))
    a, b = RunConfig(lr=1e-3, seed=0), RunConfig(lr=1e-2, seed=5)
    assert select.group(a) == select.group(b) and select.group(a) != select.group(RunConfig(width=8))
    assert select.group_id(a, [1e-3, 1e-2]) == select.group_id(b, [1e-2, 1e-3])  # the candidates as a set
    assert select.group_id(a, [1e-3, 1e-2]) != select.group_id(a, [1e-3, 1e-1])
    assert select.choose([(1e-3, 0.5), (1e-2, None), (1e-1, 0.5)])[0] == 1e-3  # a tie goes to the first
    assert select.choose([(1e-3, None), (1e-2, 0.1)])[0] == 1e-2
    assert [r.seed for r in select.after_choice(a)] == [1]


def test_dry_run_counts_and_shows_the_choices_made(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(f'name = "sel"\ndb = "{tmp_path / "r.db"}"\nout = "{tmp_path / "runs"}"\n'
                    '[grid]\ndata = ["synthetic"]\nmethod = ["xavier", "asv-backward"]\nlr = [1e-4, 1e-3, 1e-2]\n'
                    '[run]\nepochs = 2\n[select]\naxis = "lr"\nseeds = [0, 1, 2]\n')
    r = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "10 runs: 6 selection runs" in out and "then 4 runs: seeds 1, 2 at each group's choice" in out
    assert out.count("(not decided yet)") == 2
    run_sweep(SweepConfig.from_toml(path), train_fn=fake_train, progress=False)
    out = " ".join(CliRunner().invoke(app, ["sweep", str(path), "--dry-run"]).output.split())
    assert "method=xavier lr=0.001 seed=1 (chosen lr=0.001)" in out and "not decided" not in out
    # asv-backward's best rate, 1e-4, is the grid's smallest: its choice is flagged, xavier's (inside) is not
    assert "method=asv-backward lr=0.0001 seed=1 (chosen lr=0.0001; at the grid's bottom edge, beating its " \
           "neighbour: widen the grid)" in out
    assert out.count("widen the grid") == 2  # seeds 1 and 2


def test_parallel_runs_side_by_side_and_record_everything(tmp_path):
    sweep = SweepConfig.from_mapping(doc(tmp_path, methods=("xavier", "asv-backward"), seeds=(0, 1)))
    summary = run_sweep(sweep, train_fn=fake_train, progress=False, parallel=2)
    assert summary.ran == {"finished": 6 + 2}, summary.line()
    with Store(sweep.db) as s:
        assert all(len(s.epochs(r["run_id"])) == 2 for r in s.runs())
        assert {sel["group"]["method"]: sel["chosen"] for sel in s.selections()} == {"xavier": 1e-3,
                                                                                   "asv-backward": 1e-4}
    assert run_sweep(sweep, train_fn=fake_train, progress=False, parallel=2).skipped == {"finished": 8}
    with pytest.raises(ConfigError, match="--parallel: 0 is not a positive number of runs side by side"):
        run_sweep(sweep, train_fn=fake_train, progress=False, parallel=0)


def test_parallel_real_runs_one_thread_each(tmp_path):
    sweep = SweepConfig(grid={"data": ["synthetic"], "method": ["xavier", "asv-backward"]},
                        fixed={"width": 4, "epochs": 2, "batch_size": 32, "limit": 64, "image_size": 16,
                               "device": "cpu"}, db=tmp_path / "r.db", out=tmp_path / "runs")
    summary = run_sweep(sweep, progress=False, parallel=2)
    assert summary.ran == {"finished": 2}, summary.line() + "".join(e for _, e in summary.failures)
    with Store(sweep.db) as s:
        for r in s.runs():
            assert r["threads"] == 1 and r["device"] == "cpu" and r["cpu_seconds"] > 0
            assert Path(r["run_dir"], "state.pt").is_file()


def test_the_parallel_flag(tmp_path):
    r = CliRunner().invoke(app, ["sweep", "--data", "synthetic", "--methods", "xavier", "--parallel", "2",
                                 "--dry-run"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["sweep", "--data", "synthetic", "--methods", "xavier", "--engine", "ray",
                                 "--parallel", "2", "--dry-run"])
    assert r.exit_code == 2 and "--parallel: not an option of --engine ray" in r.output
    help_text = " ".join(CliRunner().invoke(app, ["sweep", "--help"]).output.split())
    assert "--parallel" in help_text and "--fixup-scalars" in help_text and "--augment" in help_text
