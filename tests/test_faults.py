"""Faults: a sweep killed with SIGKILL mid-run, three times in a row, resumes each interrupted run from its
last checkpoint and loses or repeats nothing; a sweep killed as PID 1 of a container resumes when the
container restarts; two sweeps on one database never train one run twice; an unwritable output folder or
a full disk stops a sweep before it trains anything, and a disk that fills up mid-run stops it with the
file named and the run given back; a damaged checkpoint is set aside and the run starts over; a planted
pickle never runs; two compares into one folder leave one complete output."""

import errno
import json
import math
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from probe_frames import tiny_cnn
from typer.testing import CliRunner

from initscope.cli import app
from initscope.compare import compare
from initscope.errors import PreflightError
from initscope.experiments.config import RunConfig, SweepConfig
from initscope.experiments.engines import run_sweep, run_sweep_ray
from initscope.experiments.store import Store, check_output, preflight
from initscope.experiments.training import train

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


def runs_table_of_the_first_release(extra_columns: str = "") -> str:
    """The runs table as the first release wrote it (no notes column), with ``extra_columns`` added."""
    return f"""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL,
            test_accuracy REAL, test_precision REAL, test_recall REAL, test_f1 REAL, test_loss REAL,
            best_epoch INTEGER, best_val_accuracy REAL, diverged_epoch INTEGER, error TEXT, run_dir TEXT,
            data TEXT, model TEXT, method TEXT, optimizer TEXT, lr REAL, seed INTEGER,
            started_at TEXT, finished_at TEXT, heartbeat_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, host TEXT, pid INTEGER{extra_columns});"""


def test_a_database_from_before_the_notes_column_is_migrated_in_place(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    # the runs table as the first release wrote it: no notes column
    conn.executescript(runs_table_of_the_first_release() + """
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


def test_a_database_of_the_previous_release_opens_and_gains_the_owner_columns(tmp_path):
    db = tmp_path / "prev.db"
    conn = sqlite3.connect(db)
    # the runs table as the release before owner identities wrote it (notes, no boot_id/token/...)
    conn.executescript(runs_table_of_the_first_release(", notes TEXT") + """
        INSERT INTO runs (run_id, status, config, test_accuracy, attempts, host, pid, heartbeat_at)
            VALUES ('done', 'finished', '{}', 0.75, 1, 'h', 1, 0),
                   ('orphan', 'running', '{}', NULL, 1, 'elsewhere', 7, 0);
    """)
    conn.commit()
    conn.close()
    with Store(db) as s:
        cols = {r[1] for r in s.conn.execute("PRAGMA table_info(runs)")}
        assert {"boot_id", "pid_ns", "proc_start", "token", "beat_s"} <= cols
        assert s.run("done")["test_accuracy"] == 0.75 and s.claim("done", {"method": "xavier"}).reason == "finished"
        # a claim from before heartbeats, on another host, silent past the lease: taken over as before
        assert s.claim("orphan", {"method": "xavier"}).reason == "reclaimed"
        assert s.integrity_check() == "ok"


# -- a sweep restarted in a container (issue 14, item 1) ---------------------------------------------------


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid --fork --mount-proc needs root (or user namespaces)")
def test_a_sweep_restarted_as_pid_1_in_a_new_container_resumes_its_run(tmp_path):
    # The repro: the sweep is PID 1 of its PID namespace, is killed after 2 epochs, and the same line
    # run again (PID 1 again, in a new namespace) used to report "skipped 1 (1 owned)" and exit 0.
    db = tmp_path / "x.db"
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m", "initscope", "sweep",
           "--data", "digits", "--model", "plain34", "--width", "4", "--methods", "xavier", "--epochs", "30",
           "--db", str(db), "--out", str(tmp_path / "runs"), "--threads", "1"]
    env = {**os.environ, "INITSCOPE_HEARTBEAT_S": "0.5"}  # the killed sweep's claim goes stale after 3 s, not 60
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        rows: list[tuple] = []
        while time.time() < deadline and len(rows) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.1)
            try:
                rows = query(db, "SELECT epoch, seconds FROM epochs ORDER BY epoch") if db.exists() else []
            except sqlite3.OperationalError:
                continue
        ((pid,),) = query(db, "SELECT pid FROM runs")
        assert pid == 1  # PID 1 of its namespace
        conn = sqlite3.connect(db, timeout=10)
        conn.row_factory = sqlite3.Row
        before = dict(conn.execute("SELECT * FROM runs").fetchone())  # the claim as the killed sweep left it
        conn.close()
    finally:
        proc.kill()  # --kill-child: the sweep dies with unshare
        proc.wait()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trained 1 (1 finished)" in done.stdout and "owned" not in done.stdout, done.stdout
    with Store(db) as s:
        (run,) = s.runs()
        assert run["status"] == "finished" and run["attempts"] == 2 and run["pid"] == 1
        assert run["pid_ns"] != before.get("pid_ns")  # a new container, its sweep PID 1 again
        final = {e["epoch"]: e["seconds"] for e in s.epochs(run["run_id"])}
        assert sorted(final) == list(range(1, 31))
        # resumed from the checkpoint: the epochs stored before the kill kept their measured times
        assert all(final[epoch] == seconds for epoch, seconds in rows)


# -- damaged and untrusted checkpoints (issue 14, items 2 and 8) -----------------------------------------


TINY = dict(data="synthetic", model="plain34", width=4, image_size=16, limit=64, batch_size=32, device="cpu",
            method="asv-backward", optimizer="sgd-nesterov", lr=0.01)


def _no_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def uninterrupted():
    """A 3-epoch run, trained once without a stop: what every damaged resume must end at."""
    torch.set_num_threads(1)
    return train(RunConfig(epochs=3, **TINY), progress=False)


def _interrupted(tmp_path, epochs_done=2):
    """A run folder as a kill after ``epochs_done`` epochs leaves it."""
    config = RunConfig(epochs=3, **TINY)

    class Killed(Exception):
        pass

    def stop(row):
        if row["epoch"] == epochs_done:
            raise Killed

    with pytest.raises(Killed):
        train(config, out_dir=tmp_path, progress=False, on_epoch=stop)
    return config, tmp_path / config.run_id


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _empty(p):
    p.write_bytes(b"")


def _garbage(p):
    p.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("which,damage", [
    ("state.pt", _truncate), ("state.pt", _empty), ("state.pt", _garbage),
    ("best.safetensors", _garbage), ("best.safetensors", _truncate), ("best.safetensors", Path.unlink),
], ids=["state-truncated", "state-empty", "state-garbage", "best-garbage", "best-truncated", "best-missing"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_over(tmp_path, uninterrupted, which, damage):
    # The repro: after a kill, state.pt truncated or empty, or best.safetensors missing or garbage; every
    # retry ended `failed` with EOFError / SafetensorError / FileNotFoundError, attempts 2, 3, ...
    config, run_dir = _interrupted(tmp_path)
    damage(run_dir / which)
    rows = []
    r = train(config, out_dir=tmp_path, progress=False, on_epoch=rows.append)
    assert r.status == "finished" and [h["epoch"] for h in rows] == [1, 2, 3]  # from scratch
    assert _no_seconds(r.history) == _no_seconds(uninterrupted.history) and r.test == uninterrupted.test
    assert any("set aside as" in n and "starts over" in n for n in r.notes), r.notes
    assert list(run_dir.glob("state.pt.set-aside-*"))  # kept for a look, never read again
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["notes"] == r.notes


def test_a_damaged_checkpoint_in_a_sweep_is_noted_and_the_run_finishes(tmp_path):
    sweep = SweepConfig(grid={"method": ["asv-backward"]}, fixed={k: v for k, v in TINY.items() if k != "method"}
                        | {"epochs": 3}, db=tmp_path / "r.db", out=tmp_path / "runs")
    (config,) = sweep.expand()
    _interrupted(tmp_path / "runs")
    (tmp_path / "runs" / config.run_id / "state.pt").write_bytes(b"")  # as a power loss without fsync left it
    summary = run_sweep(sweep, progress=False, threads=1)
    assert summary.ran == {"finished": 1}, summary.line()
    with Store(sweep.db) as s:
        row = s.run(config.run_id)
        assert row["status"] == "finished" and row["attempts"] == 1
        assert "state.pt could not be used" in row["notes"] and "set aside as state.pt.set-aside-" in row["notes"]


class _Planted:
    """Unpickling this writes a file: what a crafted state.pt in a shared output folder could do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "code from the output folder ran"))


def test_a_planted_pickle_never_runs_and_the_run_restarts_safely(tmp_path, uninterrupted):
    # The repro: state.pt was read with torch.load(weights_only=False); a crafted file executed on resume.
    config, run_dir = _interrupted(tmp_path)
    target = tmp_path / "pwned.txt"
    torch.save({"epoch": 1, "payload": _Planted(target)}, run_dir / "state.pt")  # torch.save's zip, as before
    try:
        r = train(config, out_dir=tmp_path, progress=False)
    except Exception as exc:  # noqa: BLE001 - what matters first is whether the file was written
        r = exc
    assert not target.exists(), "unpickling the planted state.pt ran its code"
    assert r.status == "finished" and _no_seconds(r.history) == _no_seconds(uninterrupted.history)
    assert any("a pickle" in n and "could run code" in n for n in r.notes), r.notes
    # a bare pickle, and one inside a safetensors-looking name, are never unpickled either
    _interrupted(tmp_path / "again")
    (tmp_path / "again" / config.run_id / "state.pt").write_bytes(pickle.dumps(_Planted(target)))
    train(config, out_dir=tmp_path / "again", progress=False)
    assert not target.exists()


def test_resume_state_round_trips_bit_for_bit_without_pickle(tmp_path):
    from initscope.experiments.training.checkpoint import load_state, save_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "rng": torch.get_rng_state(),
             "best_acc": -math.inf, "history": [{"epoch": 1, "lr": 1e-3}], "pair": (1, 2.5), "none": None}
    save_state(state, tmp_path / "state.pt")
    assert (tmp_path / "state.pt").read_bytes()[:8] != b"PK\x03\x04\x00\x00\x08\x08"  # not torch.save's zip
    back = load_state(tmp_path / "state.pt")
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v) and back["optimizer"]["state"][0][k].dtype == v.dtype
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())
    assert torch.equal(back["rng"], state["rng"]) and back["best_acc"] == -math.inf and back["pair"] == (1, 2.5)
    assert back["history"] == state["history"] and back["none"] is None


def test_checkpoint_writes_are_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    from initscope import fileio
    from initscope.experiments.training.checkpoint import save_weights

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    save_weights(torch.nn.Linear(2, 2), tmp_path / "best.safetensors")
    assert events == ["fsync", "rename", "fsync"]  # the file's bytes, the rename, the folder's entry


# -- a full disk during a sweep (issue 14, item 11) ----------------------------------------------------------


def test_a_full_disk_mid_sweep_stops_with_the_file_named_and_the_run_given_back(tmp_path, monkeypatch):
    # The repro: a full disk while a checkpoint was written gave "basic_ios::clear: iostream error" and a traceback.
    from initscope import fileio

    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.fh = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", Full)
    args = ["sweep", "--data", "synthetic", "--width", "4", "--limit", "64", "--image-size", "16", "--methods",
            "xavier", "--epochs", "2", "--db", str(tmp_path / "r.db"), "--out", str(tmp_path / "runs"),
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in out, out
    assert "No space left on device" in out and "best.safetensors" in out and "run the same command again" in out
    with Store(tmp_path / "r.db") as s:
        (run,) = s.runs()
        assert run["status"] == "running" and run["pid"] is None  # given back whole, not failed
    assert not list((tmp_path / "runs").rglob("*.tmp"))  # no half-written file left behind
    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "trained 1 (1 finished)" in result.output, result.output


def test_a_full_database_disk_is_an_error_naming_the_database(tmp_path):
    from initscope.errors import DiskFullError

    with Store(tmp_path / "r.db") as s:
        s.claim("a", {"method": "xavier"})
        pages = s.conn.execute("PRAGMA page_count").fetchone()[0]
        s.conn.execute(f"PRAGMA max_page_count={pages}")  # SQLite answers SQLITE_FULL, as on a full disk
        with pytest.raises(DiskFullError, match=r"writing .*r\.db: the disk is full"):
            s.add_note("a", "x" * 100_000)
        assert s.integrity_check() == "ok"


# -- two compares into one folder (issue 14, item 10) ----------------------------------------------------


def test_two_compares_into_one_folder_leave_one_complete_output(tmp_path, monkeypatch):
    # The repro: two `initscope compare` runs into one --out gave an unreadable stats.parquet, a page with one
    # model, or "not a PNG file". Made certain here: compare A reads its figures back for its page at the
    # moment compare B has just opened (emptied) one of the same name, as a writer mid-write leaves it.
    import threading

    import matplotlib.figure
    import pandas as pd

    from initscope.compare import run as compare_run

    out = tmp_path / "cmp"
    a_at_page, b_emptied, a_done = threading.Event(), threading.Event(), threading.Event()
    real_page, real_savefig = compare_run._write_page, matplotlib.figure.Figure.savefig

    def write_page(*args, **kw):
        if threading.current_thread().name == "A":
            a_at_page.set()
            b_emptied.wait(120)
        try:
            return real_page(*args, **kw)
        finally:
            if threading.current_thread().name == "A":
                a_done.set()

    def savefig(self, fname, *args, **kw):
        if threading.current_thread().name == "B" and str(fname).endswith("boxes.png"):
            open(fname, "wb").close()
            b_emptied.set()
            a_done.wait(120)  # stays empty until A has read what it reads
        return real_savefig(self, fname, *args, **kw)

    monkeypatch.setattr(compare_run, "_write_page", write_page)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    errors: dict[str, BaseException] = {}

    def run(name, methods):
        try:
            compare(tiny_cnn, methods, input_shape=(3, 16, 16), batch=4, seed=0, out_dir=out)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors[name] = exc

    a = threading.Thread(target=run, args=("A", "xavier,kaiming-forward"), name="A")
    b = threading.Thread(target=run, args=("B", "xavier,asv-backward"), name="B")
    a.start()
    assert a_at_page.wait(120)  # B starts once A has drawn everything: no two threads draw at once
    b.start()
    a.join(240)
    b.join(240)
    assert not errors, errors  # on the shared folder: A's page found B's empty boxes.png ("not a PNG file")
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.rstrip().endswith("</html>")
    frame = pd.read_parquet(out / "stats.parquet")
    shown = re.search(r"<th>methods</th><td>([^<]*)</td>", page).group(1).split(", ")
    assert list(dict.fromkeys(frame["method"])) == shown  # the page and the table are one compare's
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".compare-")]  # no staging folder left
