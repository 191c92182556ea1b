"""The results store: schema, atomic claims, takeover of abandoned runs (an owner known by more than its pid:
host, boot, pid namespace, start time, token, heartbeat), results and history."""

import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from initscope.experiments.store import STATUSES, Owner, Store
from initscope.experiments.store.sqlite import proc_start


def result(run_id, status="finished", epochs=3, best_epoch=2, diverged_epoch=None, test=None):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.2 / e,
                "val_accuracy": [0.0, 0.4, 0.7, 0.6, 0.65][e], "lr": 1e-3, "seconds": 0.5} for e in range(1, epochs + 1)]
    if status == "diverged":
        history[-1]["train_loss"] = math.nan
    test = {"accuracy": 0.71, "precision": 0.7, "recall": 0.69, "f1": 0.695, "loss": 0.8} if test is None else test
    return SimpleNamespace(run_id=run_id, status=status, history=history, best_epoch=best_epoch, test=test,
                           diverged_epoch=diverged_epoch, error=None, checkpoint=None)


CFG = {"data": "digits", "model": "plain34", "method": "xavier", "optimizer": "adam", "lr": 1e-3, "seed": 0}


def test_schema_and_wal(tmp_path):
    db = tmp_path / "r.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    runs_cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert {"run_id", "status", "config", "test_accuracy", "test_precision", "test_recall", "test_f1",
            "test_loss", "diverged_epoch", "error", "best_epoch", "attempts", "host", "pid", "stopped_epoch",
            "wall_seconds", "cpu_seconds", "device", "threads"} <= runs_cols
    epoch_info = list(conn.execute("PRAGMA table_info(epochs)"))
    assert {r[1] for r in epoch_info} == {"run_id", "epoch", "train_loss", "train_accuracy", "val_loss",
                                          "val_accuracy", "lr", "seconds", "test_accuracy", "test_loss"}
    assert sorted(r[1] for r in epoch_info if r[5]) == ["epoch", "run_id"]  # the primary key
    with pytest.raises(sqlite3.IntegrityError):  # the status check constraint
        conn.execute("INSERT INTO runs (run_id, status, config) VALUES ('x', 'pending', '{}')")
    conn.close()
    # opening again keeps what is there
    with Store(db) as s:
        s.claim("a", CFG)
    with Store(db) as s:
        assert s.run("a")["status"] == "running"


def test_claim_finish_and_skip(tmp_path):
    with Store(tmp_path / "r.db") as s:
        c = s.claim("a", CFG)
        assert c.taken and c.reason == "new" and c.attempts == 1
        assert not s.claim("a", CFG).taken  # we own it, alive: nobody else may take it
        s.add_epoch("a", {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.1, "val_loss": 2.1,
                          "val_accuracy": 0.1, "lr": 1e-3, "seconds": 1.0})
        s.add_epoch("a", {"epoch": 9, "train_loss": 2.0})  # a stale row the final history replaces
        s.finish(result("a"))
        row = s.run("a")
        assert row["status"] == "finished" and row["config"] == CFG
        assert row["test_accuracy"] == pytest.approx(0.71) and row["test_loss"] == pytest.approx(0.8)
        assert row["best_epoch"] == 2 and row["best_val_accuracy"] == pytest.approx(0.7)
        assert (row["data"], row["method"], row["lr"], row["seed"]) == ("digits", "xavier", 1e-3, 0)
        assert [e["epoch"] for e in s.epochs("a")] == [1, 2, 3]
        assert s.epochs("a")[0]["val_accuracy"] == pytest.approx(0.4)
        c = s.claim("a", CFG)
        assert not c.taken and c.reason == "finished"


def test_diverged_is_final_and_nan_is_null(tmp_path):
    with Store(tmp_path / "r.db") as s:
        s.claim("d", CFG)
        s.finish(result("d", status="diverged", epochs=2, best_epoch=1, diverged_epoch=2,
                        test={"accuracy": 0.3, "loss": math.inf}))
        row = s.run("d")
        assert row["status"] == "diverged" and row["diverged_epoch"] == 2
        assert row["test_loss"] is None and row["test_f1"] is None
        assert s.epochs("d")[1]["train_loss"] is None  # NaN stored as NULL
        assert s.claim("d", CFG).reason == "diverged"
        assert s.status_counts() == {"running": 0, "finished": 0, "diverged": 1, "failed": 0}


def test_failed_is_retried_unless_told_not_to(tmp_path):
    with Store(tmp_path / "r.db") as s:
        s.claim("f", CFG)
        s.fail("f", "Traceback ...\nRuntimeError: boom")
        assert s.run("f")["error"].endswith("boom")
        assert s.claim("f", CFG, retry_failed=False).reason == "failed"
        c = s.claim("f", CFG)
        assert c.taken and c.reason == "retry" and c.attempts == 2
        assert s.run("f")["error"] is None and s.run("f")["status"] == "running"


def test_bad_final_status(tmp_path):
    with Store(tmp_path / "r.db") as s:
        s.claim("a", CFG)
        with pytest.raises(ValueError, match="'running'.*valid: finished, diverged, failed"):
            s.finish(result("a", status="running"))
        with pytest.raises(ValueError, match="unknown status 'done'"):
            s.runs("done")


def test_released_run_is_reclaimed(tmp_path):
    with Store(tmp_path / "r.db") as s:
        s.claim("a", CFG)
        s.release("a")
        c = s.claim("a", CFG)
        assert c.taken and c.reason == "reclaimed" and c.attempts == 2


def test_dead_owner_and_expired_lease(tmp_path):
    db = tmp_path / "r.db"
    # a process that claims a run and dies without a word (as after kill -9)
    code = ("import sys; from initscope.experiments.store import Store; "
            f"s = Store({str(db)!r}); s.claim('a', {{'method': 'xavier'}}); s.claim('b', {{'method': 'xavier'}})")
    subprocess.run([sys.executable, "-c", code], check=True)
    with Store(db) as s:
        dead = s.run("a")["pid"]
        assert dead != os.getpid()
        c = s.claim("a", CFG)
        assert c.taken and c.reason == "reclaimed"
        # an owner on another host that stopped beating: only the lease can tell
        s.conn.execute("UPDATE runs SET host='elsewhere', pid=1, heartbeat_at=0 WHERE run_id='b'")
        assert s.claim("b", CFG).taken
    with Store(db, lease_s=1e12) as s:
        s.conn.execute("UPDATE runs SET host='elsewhere', pid=1, heartbeat_at=strftime('%s','now') WHERE run_id='b'")
        assert s.claim("b", CFG).reason == "owned"


def test_two_writers_never_claim_one_run_twice(tmp_path):
    db = tmp_path / "r.db"
    Store(db).close()
    ids = [f"run{i}" for i in range(40)]
    taken: dict[str, list[str]] = {"A": [], "B": []}

    def worker(name):
        with Store(db) as s:
            for rid in ids:
                if s.claim(rid, CFG).taken:
                    taken[name].append(rid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken["A"] + taken["B"]) == sorted(ids)  # each exactly once
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        assert all(r["attempts"] == 1 for r in s.runs())
        assert set(STATUSES) == set(s.status_counts())


def test_sweeps_recorded_once(tmp_path):
    with Store(tmp_path / "r.db") as s:
        s.add_sweep("abc", "demo", {"grid": {"method": ["xavier"]}}, ["r1", "r2"])
        s.add_sweep("abc", "demo", {"grid": {"method": ["other"]}}, ["r3"])
        (sw,) = s.sweeps()
        assert sw["name"] == "demo" and sw["run_ids"] == ["r1", "r2"] and sw["grid"]["grid"]["method"] == ["xavier"]


# -- who owns a claim: beyond a pid (issue 14, item 1) -----------------------------------------------------


def _pretend_owner(s, run_id, **who):
    """Rewrite the owner of a claimed run as another process would have written it."""
    sets = ", ".join(f"{k}=?" for k in who)
    s.conn.execute(f"UPDATE runs SET {sets} WHERE run_id=?", (*who.values(), run_id))


def test_a_restarted_container_reclaims_the_run_its_earlier_self_held(tmp_path):
    # The repro: a sweep that is PID 1 of its container is killed; the container restarts and the new
    # sweep is PID 1 again. Its own pid is alive, so a pid check alone calls the run "owned" for the
    # 6-hour lease and the sweep exits 0 having skipped it. Here: a claim stored by an earlier process with
    # this host, this boot, this pid namespace and this very pid, but another token.
    with Store(tmp_path / "r.db") as s:
        me = Owner.this_process()
        s.claim("a", CFG)
        _pretend_owner(s, "a", pid=me.pid, token="an-earlier-process", heartbeat_at=time.time())
        c = s.claim("a", CFG)
        assert c.taken and c.reason == "reclaimed" and c.attempts == 2
        assert s.run("a")["token"] == me.token and s.run("a")["boot_id"] == me.boot_id


def test_an_owner_from_an_earlier_boot_or_a_reused_pid_is_gone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(tmp_path / "r.db") as s:
            # a live pid of this machine, but the claim was made before the machine rebooted
            s.claim("boot", CFG)
            _pretend_owner(s, "boot", pid=sleeper.pid, token="t1", boot_id="an-earlier-boot", heartbeat_at=time.time())
            assert s.claim("boot", CFG).reason == "reclaimed"
            # a live pid, but a process that started at another time: the owner's pid was reused
            s.claim("reuse", CFG)
            _pretend_owner(s, "reuse", pid=sleeper.pid, token="t2", proc_start=1, heartbeat_at=time.time())
            assert s.claim("reuse", CFG).reason == "reclaimed"
            # the same live process as recorded: it is the owner, and keeps the run
            s.claim("alive", CFG)
            _pretend_owner(s, "alive", pid=sleeper.pid, token="t3", proc_start=proc_start(sleeper.pid),
                           heartbeat_at=time.time())
            c = s.claim("alive", CFG)
            assert not c.taken and c.reason == "owned"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_owner_elsewhere_is_judged_by_its_heartbeat(tmp_path):
    db = tmp_path / "r.db"
    # a sweep in another process that keeps its claim and beats every 0.2 s
    code = ("import sys, time; from initscope.experiments.store import Store; "
            f"s = Store({str(db)!r}, beat_s=0.2); s.claim('a', {{'method': 'xavier'}}); print('claimed', flush=True); "
            "time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "claimed"
        with Store(db) as s:
            # as if it ran in another container (pid namespace) of this machine: its pid says nothing here
            _pretend_owner(s, "a", pid_ns="pid:[another]")
            c = s.claim("a", CFG)
            assert not c.taken and c.reason == "owned" and c.retry_at is not None
            assert c.retry_at - time.time() <= 6 * 0.2 + 0.1  # stale after six missed beats
            time.sleep(c.retry_at - time.time() + 0.3)
            c = s.claim("a", CFG)  # it beat meanwhile: still alive, still its run
            assert not c.taken and c.reason == "owned"
            other.kill()
            other.wait()
            time.sleep(6 * 0.2 + 0.5)
            c = s.claim("a", CFG)  # no beat since: gone
            assert c.taken and c.reason == "reclaimed"
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_a_run_taken_over_is_not_recorded_twice(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as old:
        old.claim("a", CFG)
        _pretend_owner(old, "a", token="a-later-sweep")  # another sweep took it over meanwhile
        assert not old.holds("a")
        assert old.add_epoch("a", {"epoch": 1, "train_loss": 1.0}) is False
        assert old.finish(result("a")) is False and old.fail("a", "boom") is False
        row = old.run("a")
        assert row["status"] == "running" and row["test_accuracy"] is None and old.epochs("a") == []


def test_the_local_engine_waits_for_a_stale_heartbeat_and_reclaims(tmp_path):
    # the engine-level repro: the second sweep used to print "skipped 1 (1 owned)" and exit 0
    from initscope.experiments.config import SweepConfig
    from initscope.experiments.engines import run_sweep
    from initscope.experiments.training import RunResult

    sweep = SweepConfig(grid={"method": ["xavier"]}, fixed={"data": "synthetic", "width": 4, "epochs": 1},
                        db=tmp_path / "r.db", out=tmp_path / "runs")
    (cfg,) = sweep.expand()
    with Store(sweep.db, beat_s=0.2) as s:  # the killed container's claim: another pid namespace, beating no more
        s.claim(cfg.run_id, cfg.to_dict())
        _pretend_owner(s, cfg.run_id, pid=1, pid_ns="pid:[the-container-before-its-restart]", token="old",
                       heartbeat_at=time.time())

    def fake_train(c, *, out_dir, progress, on_epoch, resume):
        on_epoch({"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5})
        return RunResult(c.run_id, c, "finished", history=[{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}],
                         best_epoch=1, test={"accuracy": 0.5})

    t0 = time.time()
    summary = run_sweep(sweep, train_fn=fake_train, progress=False)
    assert summary.ran == {"finished": 1} and not summary.skipped, summary.line()
    assert time.time() - t0 < 10
    with Store(sweep.db) as s:
        assert s.run(cfg.run_id)["attempts"] == 2 and s.run(cfg.run_id)["status"] == "finished"
