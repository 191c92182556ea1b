"""Sweeps: config parsing and grid expansion, the runner's divergence/failure/interrupt paths through the
store (with a stand-in train function), and one real sweep on synthetic data end to end."""

import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import SweepConfigError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.engines import run_sweep
from initscope.experiments.store import Store
from initscope.experiments.training import RunResult

ROOT = Path(__file__).resolve().parents[1]

TOML = """
name = "t"
db = "{db}"
out = "{out}"

[grid]
datasets = ["digits", "synthetic"]
methods = ["xavier", "asv-backward", "kaiming-forward"]
lr = [1e-3, 1]
seeds = [0, 1]

[run]
width = 4
epochs = 2
"""


# -- configuration ------------------------------------------------------------------------------------


def test_toml_expands_the_grid(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TOML.format(db=tmp_path / "r.db", out=tmp_path / "runs"))
    sweep = SweepConfig.from_toml(path)
    assert sweep.grid["lr"] == [1e-3, 1.0] and isinstance(sweep.grid["lr"][1], float)
    runs = sweep.expand()
    assert len(runs) == 2 * 3 * 2 * 2 and len({r.run_id for r in runs}) == len(runs)
    assert all(r.width == 4 and r.epochs == 2 and isinstance(r, RunConfig) for r in runs)
    # seed outermost: the first half is one complete pass with seed 0
    assert {r.seed for r in runs[:12]} == {0} and {r.seed for r in runs[12:]} == {1}
    assert [r.method for r in runs[:6:2]] == ["xavier", "asv-backward", "kaiming-forward"]
    assert sweep.db == tmp_path / "r.db" and sweep.name == "t"
    assert sweep.sweep_id == SweepConfig.from_toml(path).sweep_id


def test_learning_rates_per_optimizer():
    sweep = SweepConfig.from_mapping({"grid": {"optimizer": ["adam", "sgd", "adadelta"], "method": ["xavier"],
                                               "lr": {"adam": [1e-3], "sgd": [0.01, 0.1], "adadelta": 1}}})
    pairs = [(r.optimizer, r.lr) for r in sweep.expand()]
    assert pairs == [("adam", 1e-3), ("sgd", 0.01), ("sgd", 0.1), ("adadelta", 1.0)]
    assert sweep.to_dict()["grid"]["lr"] == {"adam": [1e-3], "sgd": [0.01, 0.1], "adadelta": [1.0]}
    with pytest.raises(SweepConfigError, match="lr has no values for optimizer\\(s\\) rmsprop; it has: adam"):
        SweepConfig.from_mapping({"grid": {"optimizer": ["adam", "rmsprop"], "lr": {"adam": [1e-3]}}})
    with pytest.raises(SweepConfigError, match="lr: optimizer: unknown value 'adamm'"):
        SweepConfig.from_mapping({"grid": {"lr": {"adamm": [1e-3]}}})


def test_duplicates_dropped():
    sweep = SweepConfig(grid={"method": ["xavier", "xavier"], "lr": [1e-3, 0.001]})
    assert len(sweep.expand()) == 1


@pytest.mark.parametrize("doc, message", [
    ({"grid": {"methodz": ["xavier"]}}, r"grid: unknown key 'methodz'; valid: data, data_root, model"),
    ({"run": {"epoch": 3}}, r"run: unknown key 'epoch'; valid: .*epochs"),
    ({"grid": {"method": ["xavier", "he"]}}, r"method: unknown value 'he'; valid: xavier, kaiming-forward"),
    ({"grid": {"optimizer": ["adamx"]}}, r"optimizer: unknown value 'adamx'; valid: sgd, sgd-nesterov"),
    ({"grid": {"data": ["imagenet"]}}, r"data: unknown value 'imagenet'; valid: digits, synthetic"),
    ({"grid": {"model": ["resnet1000"]}}, r"model: unknown model 'resnet1000'; valid: .*plain34"),
    ({"grid": {"lr": [-1.0]}}, r"lr: -1.0 must be > 0"),
    ({"grid": {"seed": ["zero"]}}, r"seed: 'zero' is not an integer"),
    ({"grid": {"method": []}}, r"grid: method has no values"),
    ({"grid": {"lr": [1e-3]}, "run": {"lr": 1e-2}}, r"lr is set both in \[grid\] and in \[run\]"),
    ({"grid": {"methods": ["xavier"], "method": ["xavier"]}}, r"method is given twice"),
    ({"grids": {}}, r"unknown top-level key 'grids'; valid: name, db, out, grid, run"),
])
def test_bad_configs_name_the_key_and_list_the_valid(doc, message):
    with pytest.raises(SweepConfigError, match=message):
        SweepConfig.from_mapping(doc)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[grid]\nmethod = [xavier]\n")
    with pytest.raises(SweepConfigError, match="not valid TOML"):
        SweepConfig.from_toml(path)
    with pytest.raises(SweepConfigError, match="no sweep config at"):
        SweepConfig.from_toml(tmp_path / "missing.toml")


def test_flags():
    sweep = SweepConfig.from_flags(grid={"data": "digits", "method": "xavier, asv-forward", "lr": "1e-3,1e-2",
                                         "seed": "0,1,2", "optimizer": None},
                                   fixed={"width": 8, "epochs": None}, db="x.db")
    assert sweep.grid == {"data": ["digits"], "method": ["xavier", "asv-forward"], "lr": [1e-3, 1e-2],
                          "seed": [0, 1, 2]}
    assert sweep.fixed == {"width": 8} and len(sweep.expand()) == 12
    with pytest.raises(SweepConfigError, match="lr: 'fast' is not a number"):
        SweepConfig.from_flags(grid={"lr": "fast"}, fixed={})


def test_example_configs_parse():
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert examples, "examples/*.toml missing"
    for path in examples:
        assert SweepConfig.from_toml(path).expand(), path


def test_examples_name_no_path_outside_the_repository():
    """A user's clone has no ../shared beside it: where the data lie is theirs to say (--data-root)."""
    for path in sorted((ROOT / "examples").glob("*.toml")):
        sweep = SweepConfig.from_toml(path)
        paths = [str(sweep.db), str(sweep.out)]
        for run in sweep.expand():
            paths += [run.data.partition(":")[2], run.data_root or ""]
        outside = [p for p in paths if p.startswith(("/", "~")) or ".." in Path(p).parts]
        assert not outside, (path.name, outside)
        # nor do the commands in its comments: a user copies those
        assert "../shared" not in path.read_text(), path.name


def test_demo_toml_is_the_demo_sweep(tmp_path):
    from initscope.demo import DEMO_METHODS, demo_sweep

    code = demo_sweep(tmp_path)
    assert [r.run_id for r in code.expand()] == [r.run_id for r in SweepConfig.from_toml(
        ROOT / "examples" / "demo_digits.toml").expand()]
    assert code.grid["method"] == list(DEMO_METHODS) and len(DEMO_METHODS) == 7


# -- the runner with a stand-in train ------------------------------------------------------------------


class FakeTrain:
    """Plays train(): history rows through on_epoch, then a result. lr >= 1 diverges in epoch 2;
    method kaiming-forward raises; the call numbered `interrupt_at` raises KeyboardInterrupt mid-run."""

    def __init__(self, interrupt_at=None):
        self.calls = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg, *, out_dir=None, progress=True, on_epoch=None, resume=True):
        self.calls.append(cfg.run_id)
        history = []
        for epoch in range(1, cfg.epochs + 1):
            if len(self.calls) == self.interrupt_at and epoch == 2:
                raise KeyboardInterrupt
            if cfg.method == "kaiming-forward" and epoch == 2:
                raise RuntimeError(f"boom in {cfg.run_id}")
            loss = math.nan if cfg.lr >= 1 and epoch == 2 else 1.0 / epoch
            row = {"epoch": epoch, "train_loss": loss, "train_accuracy": 0.1 * epoch, "val_loss": loss,
                   "val_accuracy": 0.1 * epoch + 0.01 * cfg.seed, "lr": cfg.lr, "seconds": 0.01}
            history.append(row)
            on_epoch(row)
            if not math.isfinite(loss):
                return RunResult(cfg.run_id, cfg, "diverged", diverged_epoch=epoch, history=history, best_epoch=1,
                                 test={"accuracy": 0.1, "precision": 0.1, "recall": 0.1, "f1": 0.1, "loss": 2.3})
        return RunResult(cfg.run_id, cfg, "finished", history=history, best_epoch=cfg.epochs,
                         test={"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "loss": 1.0})


def small_sweep(tmp_path, **kw):
    grid = {"data": ["synthetic"], "method": ["xavier", "asv-backward", "kaiming-forward"], "lr": [1e-3, 1.0],
            "seed": [0, 1]}
    return SweepConfig(grid=grid, fixed={"width": 4, "epochs": 3}, db=tmp_path / "r.db", out=tmp_path / "runs", **kw)


def test_divergence_and_failure_are_results(tmp_path):
    sweep = small_sweep(tmp_path)
    fake = FakeTrain()
    summary = run_sweep(sweep, train_fn=fake, progress=False)
    assert summary.total == 12 and len(fake.calls) == 12
    # kaiming-forward raises: 4 failed; lr=1 diverges for the other two methods: 4 diverged
    assert summary.ran == {"finished": 4, "diverged": 4, "failed": 4}
    with Store(sweep.db) as s:
        for r in s.runs():
            cfg = r["config"]
            if cfg["method"] == "kaiming-forward":
                assert r["status"] == "failed" and "RuntimeError: boom in" in r["error"]
                assert "Traceback" in r["error"] and len(s.epochs(r["run_id"])) == 1  # epoch 1 stored as it went
            elif cfg["lr"] >= 1:
                assert r["status"] == "diverged" and r["diverged_epoch"] == 2
                rows = s.epochs(r["run_id"])
                assert [e["epoch"] for e in rows] == [1, 2] and rows[1]["train_loss"] is None
                assert r["test_accuracy"] == pytest.approx(0.1)
            else:
                assert r["status"] == "finished" and len(s.epochs(r["run_id"])) == 3
                assert r["run_dir"] == str(tmp_path / "runs" / r["run_id"])
        (sw,) = s.sweeps()
        assert sw["grid"]["grid"]["method"] == ["xavier", "asv-backward", "kaiming-forward"]
        assert sorted(sw["run_ids"]) == sorted(r.run_id for r in sweep.expand())
    # run again: finished and diverged are skipped, failed ones retried (and fail again)
    again = FakeTrain()
    summary = run_sweep(sweep, train_fn=again, progress=False)
    assert summary.skipped == {"finished": 4, "diverged": 4} and summary.ran == {"failed": 4}
    assert run_sweep(sweep, train_fn=FakeTrain(), progress=False, retry_failed=False).skipped["failed"] == 4


def test_a_sweep_whose_every_run_failed(tmp_path):
    sweep = SweepConfig(grid={"method": ["kaiming-forward"], "seed": [0, 1]}, fixed={"epochs": 2},
                        db=tmp_path / "r.db", out=tmp_path / "runs")
    summary = run_sweep(sweep, train_fn=FakeTrain(), progress=False)
    assert summary.ran == {"failed": 2} and summary.nothing_done
    assert [rid for rid, _ in summary.failures] == [r.run_id for r in sweep.expand()]
    assert summary.failures[0][1].startswith("Traceback") and "RuntimeError: boom in" in summary.failures[0][1]
    again = run_sweep(sweep, train_fn=FakeTrain(), progress=False, retry_failed=False)
    assert again.skipped == {"failed": 2} and again.nothing_done and not again.failures
    assert not run_sweep(small_sweep(tmp_path / "other"), train_fn=FakeTrain(), progress=False).nothing_done


def test_the_command_exits_non_zero_with_the_first_failure_in_full(tmp_path, monkeypatch):
    (tmp_path / "broken_net.py").write_text(
        "def make(num_classes=10, **kw):\n    return helper()\n\n\n"
        "def helper():\n    raise RuntimeError('this net cannot be built')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["sweep", "--data", "synthetic", "--model", "broken_net:make", "--methods", "xavier,asv-forward",
            "--epochs", "1", "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "2 runs: trained 2 (2 failed)" in result.output and "no run finished; the first failure, run" in result.output
    tail = result.output[result.output.index("first failure"):]
    # the whole traceback, down to the frame that raised, not only its last line
    assert "Traceback (most recent call last)" in tail and "in helper" in tail and "in make" in tail
    assert tail.count("RuntimeError: this net cannot be built") == 1
    result = CliRunner().invoke(app, args + ["--no-retry-failed"])
    assert result.exit_code == 1 and "every run had failed before and was not retried" in " ".join(result.output.split())


def test_resume_after_interrupt(tmp_path):
    sweep = small_sweep(tmp_path)
    first = FakeTrain(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, train_fn=first, progress=False)
    assert len(first.calls) == 3
    with Store(sweep.db) as s:
        counts = s.status_counts()
        assert counts["running"] == 1 and sum(counts.values()) == 3
        (interrupted,) = s.runs("running")
        assert interrupted["pid"] is None  # given back
        assert interrupted["run_id"] == first.calls[2]
    second = FakeTrain()
    summary = run_sweep(sweep, train_fn=second, progress=False)
    # the two completed runs are not repeated; the interrupted one is taken over and finished
    assert summary.skipped == {"finished": 2} or sum(summary.skipped.values()) == 2
    assert set(second.calls).isdisjoint(first.calls[:2]) and first.calls[2] in second.calls
    assert len(second.calls) == 10
    with Store(sweep.db) as s:
        runs = s.runs()
        assert sorted(r["run_id"] for r in runs) == sorted(r.run_id for r in sweep.expand())
        assert not s.runs("running")
        assert s.run(first.calls[2])["attempts"] == 2
        assert s.integrity_check() == "ok"
        n_epochs = s.conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0]
        n_distinct = s.conn.execute("SELECT COUNT(DISTINCT run_id || '/' || epoch) FROM epochs").fetchone()[0]
        assert n_epochs == n_distinct


# -- the real thing ----------------------------------------------------------------------------------------


def test_real_sweep_on_synthetic_end_to_end(tmp_path):
    sweep = SweepConfig(grid={"data": ["synthetic"], "method": ["xavier", "asv-backward"]},
                        fixed={"width": 4, "epochs": 2, "batch_size": 32, "limit": 64},
                        db=tmp_path / "r.db", out=tmp_path / "runs", name="e2e")
    summary = run_sweep(sweep, progress=False, threads=1)
    assert summary.ran == {"finished": 2}, summary.line()
    with Store(sweep.db) as s:
        for r in s.runs():
            assert r["status"] == "finished" and 0.0 <= r["test_accuracy"] <= 1.0
            assert r["test_loss"] > 0 and r["best_epoch"] in (1, 2)
            assert [e["epoch"] for e in s.epochs(r["run_id"])] == [1, 2]
            assert Path(r["run_dir"]).is_dir()
    again = run_sweep(sweep, progress=False)
    assert again.skipped == {"finished": 2} and not again.ran
    result = CliRunner().invoke(app, ["report", str(sweep.db), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 finished" in md and "| synthetic |" in md and "plain34, asv-backward" in md


def test_cli_flags_dry_run_and_errors(tmp_path):
    runner = CliRunner()
    db = tmp_path / "r.db"
    result = runner.invoke(app, ["sweep", "--data", "digits", "--methods", "xavier,asv-forward", "--lrs", "1e-3,1e-2",
                                 "--seeds", "0,1", "--width", "4", "--epochs", "1", "--db", str(db), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 runs" in result.output and result.output.count("method=") == 8
    assert not db.exists()
    result = runner.invoke(app, ["sweep", "--methods", "xavier,glorot", "--db", str(db)])
    assert result.exit_code == 2 and "unknown value 'glorot'" in result.output and "asv-backward" in result.output
    result = runner.invoke(app, ["sweep", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "no sweep config" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "no results database" in result.output


def test_cli_toml_with_flag_override(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TOML.format(db=tmp_path / "r.db", out=tmp_path / "runs"))
    result = CliRunner().invoke(app, ["sweep", str(path), "--methods", "xavier", "--epochs", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "8 runs" in result.output and "asv-backward" not in result.output


@pytest.mark.slow
def test_killed_cli_sweep_resumes(tmp_path):
    """A sweep killed with SIGKILL mid-run (no chance to clean up) is resumed by the same command."""
    db = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "initscope.cli", "sweep", "--data", "synthetic", "--methods", "xavier,asv-forward",
           "--seeds", "0", "--width", "4", "--epochs", "2", "--batch-size", "32", "--limit", "64",
           "--db", str(db), "--out", str(tmp_path / "runs"), "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:  # wait until one run is done and another going
        time.sleep(0.2)
        if db.exists():
            try:
                conn = sqlite3.connect(db, timeout=5)
                done = conn.execute("SELECT COUNT(*) FROM runs WHERE status='finished'").fetchone()[0]
                going = conn.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                continue
            if done >= 1 and going:
                break
    proc.kill()
    proc.wait()
    assert done >= 1
    with Store(db) as s:
        orphaned = len(s.runs("running"))  # claimed by the killed process: its pid is dead now
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        runs = s.runs()
        assert len(runs) == 2 and all(r["status"] == "finished" for r in runs)
        # the killed run was taken over once, nothing else repeated
        assert sum(r["attempts"] for r in runs) == len(runs) + orphaned
