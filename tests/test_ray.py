"""The Ray engine on a local Ray with 2 CPUs: a real sweep end to end (the same numbers as a run in this
process), resume without repeating finished runs, a raising run stored as failed, and a worker killed
mid-run retried by Ray and recorded in the store (attempts, notes). One Ray for the whole module:
starting Ray takes many seconds."""

import math
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'initscope[ray]'")

from typer.testing import CliRunner  # noqa: E402

from initscope.cli import app  # noqa: E402
from initscope.experiments.config import RunConfig, SweepConfig  # noqa: E402
from initscope.experiments.engines import run_sweep, run_sweep_ray  # noqa: E402
from initscope.experiments.store import Store  # noqa: E402
from initscope.experiments.training import RunResult, train  # noqa: E402

pytestmark = pytest.mark.slow

# the workers do not have tests/ on their path: ship this module's functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 2**20)
    yield
    if started:
        ray.shutdown()


class CountingTrain:
    """Plays train() and leaves a file per call in ``calls`` (the calls happen in worker processes).

    Method ``kaiming-forward`` raises in epoch 2. With ``crash``, the first attempt at each run whose
    method is in ``crash`` sends epoch 1 and then kills its worker process (no cleanup, like kill -9).
    """

    def __init__(self, calls: Path, crash=()):
        self.calls, self.crash = Path(calls), tuple(crash)

    def __call__(self, cfg, *, out_dir=None, progress=True, on_epoch=None, resume=True):
        self.calls.mkdir(parents=True, exist_ok=True)
        n = len(list(self.calls.glob(f"{cfg.run_id}.*")))
        (self.calls / f"{cfg.run_id}.{n}").write_text(str(os.getpid()))
        history = []
        for epoch in range(1, cfg.epochs + 1):
            if cfg.method == "kaiming-forward" and epoch == 2:
                raise RuntimeError(f"boom in {cfg.run_id}")
            row = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.1 * epoch, "val_loss": 1.0 / epoch,
                   "val_accuracy": 0.1 * epoch, "lr": cfg.lr, "seconds": 0.01}
            history.append(row)
            on_epoch(dict(row))
            if cfg.method in self.crash and n == 0 and epoch == 1:
                os._exit(1)
        return RunResult(run_id=cfg.run_id, config=cfg, status="finished", history=history, best_epoch=cfg.epochs,
                         test={"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "loss": 0.7})

    def count(self, run_id=None) -> int:
        return len(list(self.calls.glob(f"{run_id or '*'}.*"))) if self.calls.exists() else 0


def fake_sweep(tmp_path, methods, epochs=2, seeds=(0, 1)):
    return SweepConfig(grid={"data": ["synthetic"], "method": list(methods), "seed": list(seeds)},
                       fixed={"width": 4, "epochs": epochs}, db=tmp_path / "r.db", out=tmp_path / "runs")


def test_real_sweep_end_to_end_matches_a_local_run(tmp_path):
    import torch

    sweep = SweepConfig(grid={"data": ["synthetic"], "method": ["xavier", "asv-backward"]},
                        fixed={"width": 4, "epochs": 2, "batch_size": 32, "limit": 64},
                        db=tmp_path / "r.db", out=tmp_path / "runs", name="ray-e2e")
    summary = run_sweep_ray(sweep, progress=False)
    assert summary.ran == {"finished": 2} and summary.total == 2, summary.line()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (1 CPU per run): the same arithmetic
    try:
        here = train(sweep.expand()[0], progress=False)
    finally:
        torch.set_num_threads(threads)
    with Store(sweep.db) as s:
        assert s.integrity_check() == "ok"
        for r in s.runs():
            assert r["status"] == "finished" and r["attempts"] == 1 and r["pid"] == os.getpid()  # the driver owns it
            assert r["notes"].startswith("ray attempt 1 on ") and "retried" not in r["notes"]
            assert [e["epoch"] for e in s.epochs(r["run_id"])] == [1, 2]
            assert (Path(r["run_dir"]) / "best.safetensors").exists()
        row = s.run(here.run_id)
        assert row["test_accuracy"] == pytest.approx(here.test["accuracy"], abs=1e-9)
        assert row["test_loss"] == pytest.approx(here.test["loss"], rel=1e-5)
        assert [e["val_loss"] for e in s.epochs(here.run_id)] == pytest.approx([h["val_loss"] for h in here.history],
                                                                               rel=1e-5)


def test_resume_skips_runs_finished_anywhere_and_failures_are_results(tmp_path):
    sweep = fake_sweep(tmp_path, ["xavier", "asv-forward", "kaiming-forward"])
    runs = sweep.expand()
    local = CountingTrain(tmp_path / "local-calls")
    run_sweep(runs[:2], db=sweep.db, out=sweep.out, train_fn=local, progress=False)  # the local engine did two
    assert local.count() == 2
    remote = CountingTrain(tmp_path / "ray-calls")
    summary = run_sweep_ray(sweep, train_fn=remote, progress=False)
    assert summary.skipped == {"finished": 2} and summary.ran == {"finished": 2, "failed": 2}, summary.line()
    assert remote.count() == 4 and all(remote.count(r.run_id) == 0 for r in runs[:2])
    with Store(sweep.db) as s:
        for r in s.runs():
            if r["config"]["method"] == "kaiming-forward":
                assert r["status"] == "failed" and f"boom in {r['run_id']}" in r["error"]
                assert r["attempts"] == 1 and len(s.epochs(r["run_id"])) == 1  # raised: not retried by Ray
            else:
                assert r["status"] == "finished" and len(s.epochs(r["run_id"])) == 2
    again = run_sweep_ray(sweep, train_fn=remote, progress=False, retry_failed=False)
    assert again.skipped == {"finished": 4, "failed": 2} and not again.ran
    assert remote.count() == 4


def test_lost_worker_is_retried_and_recorded(tmp_path):
    sweep = fake_sweep(tmp_path, ["xavier", "asv-forward"], epochs=3, seeds=[0])
    fn = CountingTrain(tmp_path / "calls", crash=("asv-forward",))
    summary = run_sweep_ray(sweep, train_fn=fn, progress=False, max_retries=2)
    assert summary.ran == {"finished": 2}, summary.line()
    with Store(sweep.db) as s:
        assert s.integrity_check() == "ok"
        for r in s.runs():
            assert r["status"] == "finished" and [e["epoch"] for e in s.epochs(r["run_id"])] == [1, 2, 3]
            if r["config"]["method"] == "asv-forward":
                assert fn.count(r["run_id"]) == 2 and r["attempts"] == 2
                notes = r["notes"].splitlines()
                assert len(notes) == 2 and notes[1].startswith("ray attempt 2 on ")
                assert notes[1].endswith("previous worker lost, retried")
            else:
                assert fn.count(r["run_id"]) == 1 and r["attempts"] == 1
    # no retries allowed: the lost run is failed, saying why, and the next sweep tries it again
    sweep2 = fake_sweep(tmp_path / "b", ["asv-forward"], epochs=2, seeds=[0])
    fn2 = CountingTrain(tmp_path / "calls2", crash=("asv-forward",))
    summary = run_sweep_ray(sweep2, train_fn=fn2, progress=False, max_retries=0)
    assert summary.ran == {"failed": 1}
    with Store(sweep2.db) as s:
        (r,) = s.runs()
        assert "worker was lost" in r["error"] and "gave up after 1 attempt" in r["notes"]
    assert run_sweep_ray(sweep2, train_fn=fn2, progress=False, max_retries=0).ran == {"finished": 1}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cpus_per_run must be > 0"):
        run_sweep_ray([RunConfig()], db=tmp_path / "r.db", cpus_per_run=0)
    with pytest.raises(ValueError, match="db= is required"):
        run_sweep_ray([RunConfig()])
    # more CPUs per run than the cluster has: refused, not queued forever (and the claim given back)
    with pytest.raises(ValueError, match="cpus_per_run=3 but the Ray cluster has 2 CPUs"):
        run_sweep_ray([RunConfig()], db=tmp_path / "r.db", cpus_per_run=3, progress=False)
    with pytest.raises(ValueError, match=r"asks for 1 GPU\(s\); the Ray cluster has 0"):
        run_sweep_ray([RunConfig(device="cuda")], db=tmp_path / "r.db", progress=False)
    # issue 14, item 5: refused before any run is claimed (this test used to pin the run left `running`,
    # released); --gpus-per-run 1 on a cluster without GPUs alike, and nan/inf before Ray starts
    with pytest.raises(ValueError, match=r"asks for 1 GPU\(s\); the Ray cluster has 0"):
        run_sweep_ray([RunConfig(device="cpu")], db=tmp_path / "r.db", gpus_per_run=1, progress=False)
    with Store(tmp_path / "r.db") as s:
        assert s.runs() == []  # nothing claimed, nothing left `running`
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match=r"cpus_per_run must be > 0 and finite .*got"):
            run_sweep_ray([RunConfig()], db=tmp_path / "r2.db", cpus_per_run=bad)
        with pytest.raises(ValueError, match=r"gpus_per_run must be >= 0 and finite .*got"):
            run_sweep_ray([RunConfig()], db=tmp_path / "r2.db", gpus_per_run=bad)
    assert not (tmp_path / "r2.db").exists()
    # the repro: `--cpus-per-run nan` ended in "cannot convert float NaN to integer" after Ray had started
    r = CliRunner().invoke(app, ["sweep", "--methods", "xavier", "--engine", "ray", "--cpus-per-run", "nan",
                                 "--db", str(tmp_path / "r3.db"), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "cpus_per_run must be > 0 and finite" in r.output and "Traceback" not in r.output


def test_killed_ray_driver_resumes(tmp_path):
    """kill -9 of a Ray sweep's driver (the CLI, joined to this module's Ray by --address) in the middle of a
    run: its tasks die with it; the next sweep skips what finished and resumes the interrupted run."""
    import sqlite3
    import subprocess
    import time

    # 30 epochs: a run of 8 could finish between two looks at the database on a fast machine, and the
    # kill then missed the window it is aimed at (CI saw that once).
    db, out = tmp_path / "r.db", tmp_path / "runs"
    flags = ["--data", "synthetic", "--methods", "xavier,asv-forward,kaiming-backward", "--seeds", "0", "--width", "4",
             "--epochs", "30", "--batch-size", "32", "--limit", "64", "--db", str(db), "--out", str(out)]
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "initscope", "sweep", *flags, "--engine", "ray", "--address", address,
           "--cpus-per-run", "2"]  # one run at a time: the kill lands after one finished and during the next
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 180, None
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if not db.exists():
                continue
            try:
                conn = sqlite3.connect(db, timeout=5)
                done = conn.execute("SELECT COUNT(*) FROM runs WHERE status='finished'").fetchone()[0]
                going = conn.execute("SELECT r.run_id FROM runs r JOIN epochs e USING (run_id) "
                                     "WHERE r.status='running' GROUP BY r.run_id").fetchall()
                conn.close()
            except sqlite3.OperationalError:
                continue
            if done >= 1 and going:
                proc.kill()
                killed = going[0][0]
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed is not None, "the driver was not caught in the middle of a run"
    summary = run_sweep_ray(SweepConfig(grid={"data": ["synthetic"], "method": ["xavier", "asv-forward",
                                                                              "kaiming-backward"], "seed": [0]},
                                        fixed={"width": 4, "epochs": 30, "batch_size": 32, "limit": 64}, db=db, out=out),
                            progress=False)
    assert summary.skipped["finished"] >= 1 and sum(summary.ran.values()) + sum(summary.skipped.values()) == 3
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        runs = {r["run_id"]: r for r in s.runs()}
        assert len(runs) == 3 and all(r["status"] == "finished" for r in runs.values())
        assert runs[killed]["attempts"] == 2 and "ray attempt 2 on " in runs[killed]["notes"]
        assert all(r["attempts"] == 1 for rid, r in runs.items() if rid != killed)
        assert all([e["epoch"] for e in s.epochs(rid)] == list(range(1, 31)) for rid in runs)


def test_select_runs_the_seeds_after_each_choice(tmp_path):
    sweep = SweepConfig.from_mapping({"db": str(tmp_path / "r.db"), "out": str(tmp_path / "runs"),
                                      "grid": {"data": ["synthetic"], "method": ["xavier", "asv-backward"],
                                               "lr": [1e-3, 1e-2]}, "run": {"width": 4, "epochs": 2},
                                      "select": {"axis": "lr", "seeds": [0, 1, 2]}})
    train_fn = CountingTrain(tmp_path / "calls")
    summary = run_sweep_ray(sweep, train_fn=train_fn, progress=False)
    assert summary.ran == {"finished": 4 + 2 * 2} and summary.total == 8 and not summary.waiting_groups
    with Store(sweep.db) as s:
        # every lr scores alike here: the tie goes to the first lr listed
        assert [sel["chosen"] for sel in s.selections()] == [1e-3, 1e-3]
        assert sorted((r["method"], r["lr"], r["seed"]) for r in s.runs() if r["seed"] > 0) == [
            ("asv-backward", 1e-3, 1), ("asv-backward", 1e-3, 2), ("xavier", 1e-3, 1), ("xavier", 1e-3, 2)]
