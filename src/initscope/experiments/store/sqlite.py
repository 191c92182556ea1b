"""The results store: one SQLite file (WAL mode) holding every run, its per-epoch history and its metrics.

Tables:

``runs``
    one row per run: ``run_id`` (primary key, :attr:`~initscope.experiments.config.RunConfig.run_id`), ``status`` (``running``,
    ``finished``, ``diverged`` or ``failed``), ``config`` (JSON of :meth:`RunConfig.to_dict`), the
    final test metrics ``test_accuracy``, ``test_precision``, ``test_recall``, ``test_f1``,
    ``test_loss``; ``best_epoch`` and ``best_val_accuracy`` (the checkpoint the test metrics come
    from), ``diverged_epoch``, ``error`` (a failed run's traceback), ``run_dir``, the grid keys
    copied out of the JSON for plain SQL (``data``, ``model``, ``method``, ``optimizer``, ``lr``,
    ``seed``), and the bookkeeping of who ran it: ``started_at``, ``finished_at``, ``heartbeat_at``,
    ``attempts``, ``host``, ``pid``, and who that process is beyond its pid (see below): ``boot_id``,
    ``pid_ns``, ``proc_start``, ``token``, ``beat_s``; ``notes``: what happened to the run besides its
    result, one line per event (a Ray worker lost and the run retried, a damaged checkpoint set aside);
    ``stopped_epoch`` (the early stop's epoch; NULL when the run trained every epoch), ``wall_seconds`` and
    ``cpu_seconds`` (the run's wall and CPU time, summed over its attempts), ``device`` (what it trained on:
    ``cpu``, or ``cuda:0 <GPU>, AMP float16``) and ``threads`` (torch's CPU threads).
    Columns newer than a database are added to it when it is opened (``ALTER TABLE ... ADD COLUMN``).
``epochs``
    ``(run_id, epoch)`` primary key; ``train_loss``, ``train_accuracy``, ``val_loss``,
    ``val_accuracy``, ``lr``, ``seconds``; ``test_accuracy``, ``test_loss`` after the epochs a run lists in
    ``test_at`` (NULL otherwise).
``sweeps``
    what was asked for: ``sweep_id``, ``name``, ``grid`` (JSON), ``run_ids`` (JSON list), ``created_at``.
``selections``
    what a sweep's ``[select]`` chose (:mod:`initscope.experiments.config.select`): ``group_id`` (a hash of
    the group's settings, every field but the selected axis and the seed), ``axis``, ``by``, ``group``
    (JSON), ``chosen`` (JSON: the value), ``scores`` (JSON: each candidate value's score and run), ``sweep_id``
    (the sweep that decided), ``decided_at``. Decided once, from the selection runs' validation accuracy;
    a later sweep with the same group reads the same choice.

Claiming is one ``BEGIN IMMEDIATE`` transaction, so two sweeps on one database never run the same
run twice. A run left ``running`` can be taken over when its owner is gone. A pid alone cannot say so:
a sweep that is PID 1 of a container is PID 1 again after the container restarts, and finds "its own"
pid alive. So a claim records its owner (:class:`Owner`): the host, the kernel's boot id, the pid
namespace, the pid with its start time, a random token drawn once per process, and the interval of the
heartbeat it renews (a thread of the :class:`Store` renews ``heartbeat_at`` of every run it holds every
``beat_s`` seconds). The owner is gone when:

- its claim was released (Ctrl-C);
- it ran on this host in an earlier boot (the boot id changed);
- it ran in this pid namespace of this boot and its pid is dead, is this very process (another token),
  or belongs to a process started at another time (the pid was reused);
- elsewhere (another host, another container): its heartbeat is older than :data:`STALE_BEATS` beats.
  A claim whose heartbeat is still fresh is answered with the time the answer may change
  (:attr:`Claim.retry_at`), and the engines ask once more then: a restarted container reclaims its run
  within a minute, a live sweep elsewhere keeps it;
- an owner that renews no heartbeat (a release before heartbeats) and cannot be checked by its pid: no
  epoch written within the lease (``lease_s``, 6 hours).

Every write of a run's epochs and result checks that this process still holds the claim (its token),
so a sweep that was paused past its heartbeat and taken over cannot record the run a second time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from initscope.errors import DiskFullError, StoreError

STATUSES = ("running", "finished", "diverged", "failed")
DONE = ("finished", "diverged")  # a re-run skips these; "failed" is retried
METRICS = ("accuracy", "precision", "recall", "f1", "loss")
EPOCH_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds", "test_accuracy",
                 "test_loss")
GRID_COLUMNS = ("data", "model", "method", "optimizer", "lr", "seed")
DEFAULT_LEASE_S = 6 * 3600.0
# How often a Store renews the heartbeat of the runs it holds (``INITSCOPE_HEARTBEAT_S`` overrides it),
# and how many beats an owner may miss before a sweep elsewhere takes its run over: 10 s x 6 = a minute,
# long enough for a busy machine's scheduler and a database lock, short enough to wait for.
DEFAULT_BEAT_S = 10.0
STALE_BEATS = 6
# Columns a database written by an earlier release may lack; _migrate adds them (every row keeps its values).
_ADDED_COLUMNS = (("notes", "TEXT"), ("boot_id", "TEXT"), ("pid_ns", "TEXT"), ("proc_start", "INTEGER"),
                  ("token", "TEXT"), ("beat_s", "REAL"), ("stopped_epoch", "INTEGER"), ("wall_seconds", "REAL"),
                  ("cpu_seconds", "REAL"), ("device", "TEXT"), ("threads", "INTEGER"))
_ADDED_EPOCH_COLUMNS = (("test_accuracy", "REAL"), ("test_loss", "REAL"))
RUN_FACTS = ("stopped_epoch", "wall_seconds", "cpu_seconds", "device", "threads")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    config TEXT NOT NULL,
    test_accuracy REAL, test_precision REAL, test_recall REAL, test_f1 REAL, test_loss REAL,
    best_epoch INTEGER, best_val_accuracy REAL, diverged_epoch INTEGER, error TEXT, run_dir TEXT,
    data TEXT, model TEXT, method TEXT, optimizer TEXT, lr REAL, seed INTEGER,
    started_at TEXT, finished_at TEXT, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, host TEXT, pid INTEGER, notes TEXT,
    boot_id TEXT, pid_ns TEXT, proc_start INTEGER, token TEXT, beat_s REAL,
    stopped_epoch INTEGER, wall_seconds REAL, cpu_seconds REAL, device TEXT, threads INTEGER
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, lr REAL, seconds REAL,
    test_accuracy REAL, test_loss REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS selections (
    group_id TEXT PRIMARY KEY,
    axis TEXT NOT NULL,
    by TEXT NOT NULL,
    grp TEXT NOT NULL,
    chosen TEXT NOT NULL,
    scores TEXT NOT NULL,
    sweep_id TEXT,
    decided_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    name TEXT,
    grid TEXT NOT NULL,
    run_ids TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite_or_none(x: Any) -> float | None:
    # SQLite stores NaN as NULL anyway; be explicit so a diverged loss reads back as "no value".
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists in this pid namespace (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def proc_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22); None where
    there is no ``/proc`` or no such process. A pid with another start time is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields from its closing one
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]": one value per pid namespace
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: enough to tell, from another process, whether it is still there.

    Attributes:
        host: the host name.
        boot_id: the kernel's boot id (``/proc/sys/kernel/random/boot_id``); a new one after a reboot.
        pid_ns: the pid namespace (containers each have their own); pids compare only within one.
        pid: the process id, and ``proc_start`` its start time (ticks since boot): a reused pid has another.
        token: drawn at random once per process; no other process, now or after a restart, has it.
    """

    host: str
    boot_id: str | None
    pid_ns: str | None
    pid: int
    proc_start: int | None
    token: str

    @staticmethod
    def this_process() -> "Owner":
        """This process (drawn anew in a forked child, whose pid differs)."""
        return _this_process(os.getpid())


@functools.lru_cache(maxsize=4)
def _this_process(pid: int) -> Owner:
    return Owner(socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), _pid_ns(), pid,
                 proc_start(pid), secrets.token_hex(8))


def _default_beat_s() -> float:
    text = os.environ.get("INITSCOPE_HEARTBEAT_S")
    if not text:
        return DEFAULT_BEAT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"INITSCOPE_HEARTBEAT_S={text!r}: must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` decided: ``taken`` is True when this process now owns the run.

    ``retry_at`` (with reason ``owned``): the owner cannot be checked from here (another host or
    container) and its heartbeat is fresh; ask again after this time (``time.time()``), when a missed
    heartbeat would show it gone.
    """

    taken: bool
    reason: str  # "new", "retry", "reclaimed", or why not: "finished", "diverged", "failed", "owned"
    attempts: int = 0
    retry_at: float | None = None


class _Heartbeat:
    """A daemon thread renewing ``heartbeat_at`` of the runs a Store holds, on its own connection (a
    connection must not be shared by two threads' transactions)."""

    def __init__(self, path: Path, token: str, beat_s: float, timeout_s: float) -> None:
        self.path, self.token, self.beat_s, self.timeout_s = path, token, beat_s, timeout_s
        self.runs: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="initscope-heartbeat", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        try:
            while not self.stop.wait(self.beat_s):
                with self.lock:
                    runs = sorted(self.runs)
                if not runs:
                    continue
                try:
                    conn.execute(f"UPDATE runs SET heartbeat_at=? WHERE token=? AND status='running' AND run_id IN "
                                 f"({','.join('?' * len(runs))})", (time.time(), self.token, *runs))
                except sqlite3.Error:  # a lock held too long, a full disk: the next beat tries again
                    continue
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=self.timeout_s)


class Store:
    """A results database; one connection per instance (open one per process or thread).

    Args:
        path: the SQLite file; created with its tables if missing.
        lease_s: a ``running`` run whose owner renews no heartbeat and cannot be checked by its pid is
            taken over when it has written no epoch for this long.
        timeout_s: how long a write waits for another writer's lock.
        beat_s: how often this store renews the heartbeat of the runs it holds (default 10 s, or
            ``INITSCOPE_HEARTBEAT_S``); a sweep elsewhere takes a run over after :data:`STALE_BEATS`
            missed beats.

    Raises:
        StoreError: ``path`` is a folder, not an SQLite file, damaged, or an SQLite file of something
            else; the file is left as it was.

    Examples:
        >>> with Store("runs.db") as store:  # doctest: +SKIP
        ...     store.claim(run_id, config).taken
    """

    def __init__(self, path: str | Path, *, lease_s: float = DEFAULT_LEASE_S, timeout_s: float = 60.0,
                 beat_s: float | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results database; give the database's file "
                             "(--db runs.db)")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_s = float(lease_s)
        self.beat_s = _default_beat_s() if beat_s is None else float(beat_s)
        self.timeout_s = float(timeout_s)
        self.owner = Owner.this_process()
        self.host, self.pid = self.owner.host, self.owner.pid
        self._heartbeat: _Heartbeat | None = None
        existing = self.path.is_file() and self.path.stat().st_size > 0
        # isolation_level=None: we write our own BEGIN IMMEDIATE, so the lock is taken before the read
        # that decides a claim, not lazily at the first write.
        self.conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        try:
            if existing:  # read before anything is written: a file we cannot use stays as it was
                self._check_existing()
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch the database to WAL mode (got {mode!r})")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(_SCHEMA)  # IF NOT EXISTS throughout: opening an existing store changes nothing
            self._migrate()
        except sqlite3.Error as exc:
            self.conn.close()
            raise StoreError(f"{self.path}: cannot be used as a results database (SQLite: {exc}); "
                             "it was left as it was") from None
        except BaseException:
            self.conn.close()
            raise

    def _check_existing(self) -> None:
        """Refuse, reading only, a file that is not an SQLite database, is damaged, or holds something else."""
        try:
            problems = [r[0] for r in self.conn.execute("PRAGMA quick_check").fetchall()]
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a readable SQLite database ({exc}); it was left as it was. "
                             "Pick another --db, or move this file away to start a new results store") from None
        if problems != ["ok"]:
            raise StoreError(f"{self.path}: the database is damaged (SQLite's check: {problems[0]}); it was left "
                             "as it was. Restore it from a copy (sqlite3 FILE .recover salvages what it can), or "
                             "pick another --db")
        if tables and "runs" not in tables:
            raise StoreError(f"{self.path}: an SQLite database, but not an initscope results store (its tables: "
                             f"{', '.join(sorted(tables))}); it was left as it was. Pick another --db")

    def _migrate(self) -> None:
        """Add the columns newer than a database's schema (ADD COLUMN keeps every row; a no-op when present)."""
        added = (("runs", _ADDED_COLUMNS), ("epochs", _ADDED_EPOCH_COLUMNS))

        def missing(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
            out = []
            for table, columns in added:
                have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
                out += [(table, name, kind) for name, kind in columns if name not in have]
            return out

        if not missing(self.conn):
            return
        with self._write() as c:
            for table, name, kind in missing(c):  # read again inside the lock: another opener may have won
                c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front (``BEGIN IMMEDIATE``); a full disk is a
        :class:`~initscope.errors.DiskFullError` naming the database."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13) or "is full" in str(exc):
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise DiskFullError(f"writing {self.path}: the disk is full (SQLite: {exc}); free some space and "
                                    "run the same command again, it resumes where it stopped") from None
            raise

    def _hold(self, run_id: str) -> None:
        """Renew ``run_id``'s heartbeat from now on (the thread starts with the first claim)."""
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self.path, self.owner.token, self.beat_s, self.timeout_s)
        with self._heartbeat.lock:
            self._heartbeat.runs.add(run_id)

    def _let_go(self, run_id: str) -> None:
        if self._heartbeat is not None:
            with self._heartbeat.lock:
                self._heartbeat.runs.discard(run_id)

    # -- sweeps -----------------------------------------------------------------------------------

    def add_sweep(self, sweep_id: str, name: str | None, grid: Mapping[str, Any], run_ids: Iterable[str]) -> None:
        """Record what a sweep asked for (again on every re-run; the first record stays)."""
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO sweeps (sweep_id, name, grid, run_ids, created_at) VALUES (?,?,?,?,?)",
                      (sweep_id, name, json.dumps(dict(grid)), json.dumps(list(run_ids)), _now()))

    def sweeps(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM sweeps ORDER BY created_at, sweep_id").fetchall()
        return [{**dict(r), "grid": json.loads(r["grid"]), "run_ids": json.loads(r["run_ids"])} for r in rows]

    def add_sweep_runs(self, sweep_id: str, run_ids: Iterable[str]) -> None:
        """Add runs a sweep planned later (the runs after a ``[select]`` choice) to its recorded list."""
        with self._write() as c:
            row = c.execute("SELECT run_ids FROM sweeps WHERE sweep_id=?", (sweep_id,)).fetchone()
            if row is None:
                return
            have = json.loads(row["run_ids"])
            new = [r for r in run_ids if r not in set(have)]
            if new:
                c.execute("UPDATE sweeps SET run_ids=? WHERE sweep_id=?", (json.dumps(have + new), sweep_id))

    # -- selections ([select] in a sweep) ----------------------------------------------------------

    def selection(self, group_id: str) -> dict[str, Any] | None:
        """The recorded choice of a selection group, or None when it is not decided yet."""
        r = self.conn.execute("SELECT * FROM selections WHERE group_id=?", (group_id,)).fetchone()
        if r is None:
            return None
        return {**dict(r), "group": json.loads(r["grp"]), "chosen": json.loads(r["chosen"]),
                "scores": json.loads(r["scores"])}

    def decide(self, group_id: str, *, axis: str, by: str, group: Mapping[str, Any], chosen: Any,
               scores: Any, sweep_id: str | None) -> dict[str, Any]:
        """Record a group's choice, unless one is recorded already (the first decision stays); returns the
        recorded one."""
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO selections (group_id, axis, by, grp, chosen, scores, sweep_id, decided_at)"
                      " VALUES (?,?,?,?,?,?,?,?)", (group_id, axis, by, json.dumps(dict(group), sort_keys=True),
                                                   json.dumps(chosen), json.dumps(scores), sweep_id, _now()))
        return self.selection(group_id)  # type: ignore[return-value]

    def selections(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT group_id FROM selections ORDER BY decided_at, group_id").fetchall()
        return [self.selection(r["group_id"]) for r in rows]

    # -- the life of a run ------------------------------------------------------------------------

    def _owner_gone(self, row: sqlite3.Row, now: float) -> tuple[bool, float | None]:
        """Whether the owner of a ``running`` row is gone (see the module docstring), and, when only its
        heartbeat can tell and it is still fresh, the time it would be stale."""
        me = self.owner
        if row["pid"] is None:  # released by its owner (Ctrl-C)
            return True, None
        if row["token"] is not None and row["token"] == me.token:  # this process holds it
            return False, None
        beat = row["heartbeat_at"]
        if row["host"] == me.host and row["boot_id"] and me.boot_id and row["boot_id"] != me.boot_id:
            return True, None  # the owner ran in an earlier boot of this machine
        same_pids = row["host"] == me.host and (row["pid_ns"] is None or me.pid_ns is None
                                                or row["pid_ns"] == me.pid_ns)
        if same_pids:
            pid = int(row["pid"])
            if pid == me.pid:  # our pid, not our token: the owner was an earlier process (a restarted container)
                return True, None
            if not pid_alive(pid):
                return True, None
            if row["proc_start"] is not None and proc_start(pid) not in (None, int(row["proc_start"])):
                return True, None  # the pid was reused by a process started later
        elif row["beat_s"] is not None and beat is not None:
            # another host or container: only its heartbeat can tell
            stale_at = float(beat) + STALE_BEATS * float(row["beat_s"])
            return (True, None) if now > stale_at else (False, stale_at)
        return beat is None or now - float(beat) > self.lease_s, None

    def claim(self, run_id: str, config: Mapping[str, Any], *, retry_failed: bool = True) -> Claim:
        """Atomically take a run for this process, or say why not.

        A run nobody has started is inserted as ``running``. A ``finished`` or ``diverged`` run is
        never run again; a ``failed`` one is retried when ``retry_failed``; a ``running`` one is taken
        over only when its owner is gone (see the module docstring). From the claim on, this store
        renews the run's heartbeat until it is finished, failed or released.
        """
        now = time.time()
        grid = [config.get(k) for k in GRID_COLUMNS]
        me = self.owner
        who = (now, me.host, me.pid, me.boot_id, me.pid_ns, me.proc_start, me.token, self.beat_s)
        with self._write() as c:
            row = c.execute("SELECT status, host, pid, boot_id, pid_ns, proc_start, token, beat_s, heartbeat_at, "
                            "attempts FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                c.execute(
                    f"INSERT INTO runs (run_id, status, config, {', '.join(GRID_COLUMNS)}, started_at, heartbeat_at,"
                    " host, pid, boot_id, pid_ns, proc_start, token, beat_s, attempts)"
                    " VALUES (?, 'running', ?, ?,?,?,?,?,?, ?, ?,?,?,?,?,?,?,?, 1)",
                    (run_id, json.dumps(dict(config), sort_keys=True), *grid, _now(), *who))
                self._hold(run_id)
                return Claim(True, "new", 1)
            status = row["status"]
            if status in DONE or (status == "failed" and not retry_failed):
                return Claim(False, status, row["attempts"])
            if status == "running":
                gone, retry_at = self._owner_gone(row, now)
                if not gone:
                    return Claim(False, "owned", row["attempts"], retry_at)
            attempts = int(row["attempts"]) + 1
            c.execute(
                "UPDATE runs SET status='running', config=?, started_at=?, finished_at=NULL, heartbeat_at=?,"
                " host=?, pid=?, boot_id=?, pid_ns=?, proc_start=?, token=?, beat_s=?, attempts=?, error=NULL"
                " WHERE run_id=?",
                (json.dumps(dict(config), sort_keys=True), _now(), *who, attempts, run_id))
            self._hold(run_id)
            return Claim(True, "retry" if status == "failed" else "reclaimed", attempts)

    def holds(self, run_id: str) -> bool:
        """Whether this process holds the claim on ``run_id`` (it was not taken over meanwhile)."""
        row = self.conn.execute("SELECT status, token FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row is not None and row["status"] == "running" and row["token"] == self.owner.token

    def add_epoch(self, run_id: str, row: Mapping[str, Any]) -> bool:
        """Store one epoch's history row as it happens, and renew this process's lease on the run.

        Returns False, storing nothing, when the run is no longer this process's (taken over by a sweep
        that found its heartbeat stale): the caller should stop training it.
        """
        with self._write() as c:
            held = c.execute("UPDATE runs SET heartbeat_at=? WHERE run_id=? AND token=? AND status='running'",
                             (time.time(), run_id, self.owner.token)).rowcount
            if held:
                self._put_epoch(c, run_id, row)
        return bool(held)

    @staticmethod
    def _put_epoch(c: sqlite3.Connection, run_id: str, row: Mapping[str, Any]) -> None:
        c.execute(
            f"INSERT OR REPLACE INTO epochs (run_id, epoch, {', '.join(EPOCH_COLUMNS)}) "
            f"VALUES (?, ?, {','.join('?' * len(EPOCH_COLUMNS))})",
            (run_id, int(row["epoch"]), *(_finite_or_none(row.get(k)) for k in EPOCH_COLUMNS)))

    def finish(self, result: Any) -> bool:
        """Record a :class:`RunResult`: status, test metrics, its full history, and its ``notes`` (if any)
        appended to the run's.

        The history in the result is the truth: it replaces whatever epochs were stored while the
        run went (a resumed or repeated run may have left rows past the end of this one). Returns False,
        recording nothing, when the run is no longer this process's (another sweep took it over).
        """
        status = result.status
        if status not in STATUSES or status == "running":
            raise ValueError(f"run {result.run_id}: status {status!r} is not a final status; "
                             f"valid: finished, diverged, failed")
        test = dict(result.test or {})
        history = list(result.history or [])
        best_epoch = getattr(result, "best_epoch", None)
        best_val = None
        for h in history:
            if best_epoch is not None and int(h["epoch"]) == int(best_epoch):
                best_val = _finite_or_none(h.get("val_accuracy"))
        checkpoint = getattr(result, "checkpoint", None)
        run_dir = str(Path(checkpoint).parent) if checkpoint else None
        with self._write() as c:
            if not self._held(c, result.run_id):
                return False
            c.execute("DELETE FROM epochs WHERE run_id=?", (result.run_id,))
            for h in history:
                self._put_epoch(c, result.run_id, h)
            c.execute(
                "UPDATE runs SET status=?, test_accuracy=?, test_precision=?, test_recall=?, test_f1=?, test_loss=?,"
                " best_epoch=?, best_val_accuracy=?, diverged_epoch=?, error=?, run_dir=COALESCE(?, run_dir),"
                f" finished_at=?, {', '.join(f'{k}=?' for k in RUN_FACTS)} WHERE run_id=?",
                (status, *(_finite_or_none(test.get(m)) for m in METRICS),
                 None if best_epoch is None else int(best_epoch), best_val,
                 getattr(result, "diverged_epoch", None), getattr(result, "error", None), run_dir, _now(),
                 *(getattr(result, k, None) for k in RUN_FACTS), result.run_id))
            for note in getattr(result, "notes", None) or ():
                self._note(c, result.run_id, note)
        self._let_go(result.run_id)
        return True

    def _held(self, c: sqlite3.Connection, run_id: str) -> bool:
        """Inside a write: the run is ``running`` under this process's token."""
        row = c.execute("SELECT status, token FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row is not None and row["status"] == "running" and row["token"] == self.owner.token

    def fail(self, run_id: str, error: str) -> bool:
        """Mark a run ``failed`` with the error text (a traceback); the sweep goes on. False (nothing
        written) when the run is no longer this process's."""
        with self._write() as c:
            if not self._held(c, run_id):
                return False
            c.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?", (error, _now(), run_id))
        self._let_go(run_id)
        return True

    @staticmethod
    def _note(c: sqlite3.Connection, run_id: str, text: str, new_attempt: bool = False) -> None:
        c.execute("UPDATE runs SET notes=CASE WHEN notes IS NULL OR notes='' THEN ? ELSE notes || char(10) || ? END,"
                  " attempts=attempts+? WHERE run_id=?", (text, text, int(new_attempt), run_id))

    def add_note(self, run_id: str, text: str, *, new_attempt: bool = False) -> None:
        """Append a line to the run's ``notes``; ``new_attempt`` also counts one more attempt (a retry that
        the claim did not see, such as Ray re-running a task whose worker died)."""
        with self._write() as c:
            self._note(c, run_id, text, new_attempt)

    def set_run_dir(self, run_id: str, run_dir: str | Path) -> None:
        with self._write() as c:
            c.execute("UPDATE runs SET run_dir=? WHERE run_id=?", (str(run_dir), run_id))

    def release(self, run_id: str) -> None:
        """Give a run back (Ctrl-C, a full disk): it stays ``running`` with no owner, so the next sweep takes
        it over at once."""
        self._let_go(run_id)
        with self._write() as c:
            c.execute("UPDATE runs SET pid=NULL, heartbeat_at=NULL, token=NULL WHERE run_id=? AND status='running'"
                      " AND token=?", (run_id, self.owner.token))

    # -- reading ----------------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if r is None else {**dict(r), "config": json.loads(r["config"])}

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        q = "SELECT * FROM runs" + (" WHERE status=?" if status else "") + " ORDER BY started_at, run_id"
        rows = self.conn.execute(q, (status,) if status else ()).fetchall()
        return [{**dict(r), "config": json.loads(r["config"])} for r in rows]

    def epochs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM epochs" + (" WHERE run_id=?" if run_id else "") + " ORDER BY run_id, epoch"
        return [dict(r) for r in self.conn.execute(q, (run_id,) if run_id else ()).fetchall()]

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            counts[status] = n
        return counts

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` when the file is sound."""
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])
