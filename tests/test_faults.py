"""Faults: a sweep killed with SIGKILL mid-run, three times in a row, resumes each interrupted run from its
last checkpoint and loses or repeats nothing; two sweeps on one database never train one run twice; an
unwritable output folder or a full disk stops a sweep before it trains anything."""

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initscope.cli import app
from initscope.errors import PreflightError
from initscope.experiments.config import SweepConfig
from initscope.experiments.engines import run_sweep, run_sweep_ray
from initscope.experiments.store import Store, check_output, preflight

SWEEP_FLAGS = ["--data", "synthetic", "--width", "4", "--batch-size", "32", "--limit", "64", "--threads", "1"]


def sweep_cmd(tmp_path, methods, seeds, epochs):
    return [sys.executable, "-m", "initscope", "sweep", *SWEEP_FLAGS, "--methods", methods, "--seeds", seeds,
            "--epochs", str(epochs), "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "runs")]


def query(db: Path, sql: str, args=()) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def kill_mid_run(cmd, cwd, db: Path, finished_before: int, timeout_s: float = 150) -> tuple[str, list[tuple]]:
    """Start the sweep, wait until it has finished one more run and stored an epoch of the next one, SIGKILL it.

    Returns the interrupted run's id and its epoch rows (epoch, seconds) as stored before the kill.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed mid-run"
            time.sleep(0.05)
            if not db.exists():
                continue
            try:
                done = query(db, "SELECT COUNT(*) FROM runs WHERE status='finished'")[0][0]
                going = query(db, "SELECT r.run_id FROM runs r JOIN epochs e USING (run_id) WHERE r.status='running'"
                                  " AND r.pid=? GROUP BY r.run_id", (proc.pid,))
            except sqlite3.OperationalError:  # locked for a moment by the writer
                continue
            if done > finished_before and going:
                proc.kill()
                proc.wait()
                run_id = going[0][0]
                return run_id, query(db, "SELECT epoch, seconds FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))
        pytest.fail("the sweep did not reach the middle of a run in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_three_times_resumes_from_checkpoints(tmp_path):
    # four runs: each of the three starts finishes one more and is killed in the next (the last one
    # finishes the fourth)
    cmd = sweep_cmd(tmp_path, "xavier,asv-forward", "0,1", epochs=3)
    db = tmp_path / "r.db"
    interrupted: list[tuple[str, list[tuple]]] = []
    counts = []
    for kill in range(3):
        finished = query(db, "SELECT COUNT(*) FROM runs WHERE status='finished'")[0][0] if db.exists() else 0
        run_id, rows = kill_mid_run(cmd, tmp_path, db, finished)
        assert rows and (tmp_path / "runs" / run_id / "state.pt").exists()  # a checkpoint to resume from
        interrupted.append((run_id, rows))
        with Store(db) as s:
            assert s.integrity_check() == "ok"
            c = s.status_counts()
        counts.append((kill + 1, c["finished"], c["running"]))
        print(f"kill {kill + 1}: {c['finished']} finished, {c['running']} interrupted (run {run_id} after "
              f"epoch {rows[-1][0]})")
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        runs = s.runs()
        assert len(runs) == 4 and all(r["status"] == "finished" for r in runs)  # every run there, once
        taken_over = {rid for rid, _ in interrupted}
        for r in runs:
            # claimed once, plus once more for each kill that caught it mid-run
            assert r["attempts"] == 1 + sum(rid == r["run_id"] for rid, _ in interrupted)
            assert [e["epoch"] for e in s.epochs(r["run_id"])] == [1, 2, 3]
        for run_id, rows in interrupted:
            # resumed from the checkpoint, not trained again: the epochs before the kill keep their
            # measured wall times (a re-run would have measured new ones)
            final = {e["epoch"]: e["seconds"] for e in s.epochs(run_id)}
            assert all(final[epoch] == seconds for epoch, seconds in rows), (run_id, rows, final)
        assert len(taken_over) >= 1
    print("runs finished after kills and resume:", [c[1] for c in counts], "->", len(runs))


@pytest.mark.slow
def test_two_sweeps_on_one_database_never_train_a_run_twice(tmp_path):
    cmd = sweep_cmd(tmp_path, "xavier,asv-forward,kaiming-backward,asv-backward", "0", epochs=1)
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    trained = [int(re.search(r"trained (\d+)", o).group(1)) for o in outputs]
    assert sum(trained) == 4, outputs  # each run trained by exactly one of the two
    with Store(tmp_path / "r.db") as s:
        assert s.integrity_check() == "ok"
        runs = s.runs()
        assert len(runs) == 4 and all(r["status"] == "finished" and r["attempts"] == 1 for r in runs)


# -- before training: the output folder and the disk ----------------------------------------------------


def never_called(*a, **kw):
    raise AssertionError("training started")


def test_output_under_a_file_is_an_error_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sweep = SweepConfig(grid={"method": ["xavier"]}, db=tmp_path / "r.db", out=blocker / "runs")
    with pytest.raises(PreflightError, match=r"output folder .*a-file/runs cannot be created"):
        run_sweep(sweep, train_fn=never_called, progress=False)
    with pytest.raises(PreflightError, match="cannot be created"):  # before Ray is even started
        run_sweep_ray(sweep, train_fn=never_called, progress=False)
    assert not (tmp_path / "r.db").exists()
    result = CliRunner().invoke(app, ["sweep", "--methods", "xavier", "--db", str(tmp_path / "r.db"),
                                      "--out", str(blocker / "runs")])
    assert result.exit_code == 2 and "cannot be created" in result.output and "--out" in result.output
    assert not (tmp_path / "r.db").exists()
    result = CliRunner().invoke(app, ["train", "--data", "synthetic", "--out", str(blocker / "runs")])
    assert result.exit_code == 2 and "cannot be created" in " ".join(result.output.split())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_output_folder_is_an_error_before_training(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(PreflightError, match=r"output folder .*ro is not writable"):
            run_sweep(SweepConfig(grid={"method": ["xavier"]}, db=tmp_path / "r.db", out=out), train_fn=never_called,
                      progress=False)
    finally:
        out.chmod(0o700)


def test_full_disk_is_an_error_before_training(tmp_path, monkeypatch):
    real = preflight.shutil.disk_usage

    def nearly_full(path):
        u = real(path)
        return type(u)(u.total, u.total - 3 * 2**20, 3 * 2**20)  # 3 MiB free

    monkeypatch.setattr(preflight.shutil, "disk_usage", nearly_full)
    sweep = SweepConfig(grid={"method": ["xavier"]}, db=tmp_path / "r.db", out=tmp_path / "runs")
    with pytest.raises(PreflightError, match=r"only 3 MiB free on its disk, a sweep needs at least 512 MiB"):
        run_sweep(sweep, train_fn=never_called, progress=False)
    assert not (tmp_path / "r.db").exists()
    result = CliRunner().invoke(app, ["sweep", "--methods", "xavier", "--db", str(tmp_path / "r.db"),
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "only 3 MiB free" in result.output
    check_output(tmp_path / "runs", tmp_path / "r.db", min_free_mb=1)  # the threshold is the rule: 3 MiB is enough for 1


def test_a_database_from_before_the_notes_column_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    # the runs table as the first release wrote it: no notes column
    conn.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL,
            test_accuracy REAL, test_precision REAL, test_recall REAL, test_f1 REAL, test_loss REAL,
            best_epoch INTEGER, best_val_accuracy REAL, diverged_epoch INTEGER, error TEXT, run_dir TEXT,
            data TEXT, model TEXT, method TEXT, optimizer TEXT, lr REAL, seed INTEGER,
            started_at TEXT, finished_at TEXT, heartbeat_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, host TEXT, pid INTEGER);
        INSERT INTO runs (run_id, status, config, test_accuracy, attempts) VALUES ('old', 'finished', '{}', 0.75, 1);
    """)
    conn.commit()
    conn.close()
    with Store(db) as s:
        row = s.run("old")
        assert row["status"] == "finished" and row["test_accuracy"] == 0.75 and row["notes"] is None
        s.claim("new", {"method": "xavier"})
        s.add_note("new", "first line")
        s.add_note("new", "second line", new_attempt=True)
        assert s.run("new")["notes"] == "first line\nsecond line" and s.run("new")["attempts"] == 2
        assert s.integrity_check() == "ok"
    with Store(db) as s:  # opening again changes nothing
        assert sorted(r["run_id"] for r in s.runs()) == ["new", "old"] and s.run("new")["attempts"] == 2
