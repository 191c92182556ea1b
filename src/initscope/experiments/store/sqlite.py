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
    ``attempts``, ``host``, ``pid``; ``notes``: what happened to the run besides its result, one line
    per event (a Ray worker lost and the run retried), added to older databases on open.
``epochs``
    ``(run_id, epoch)`` primary key; ``train_loss``, ``train_accuracy``, ``val_loss``,
    ``val_accuracy``, ``lr``, ``seconds``.
``sweeps``
    what was asked for: ``sweep_id``, ``name``, ``grid`` (JSON), ``run_ids`` (JSON list), ``created_at``.

Claiming is one ``BEGIN IMMEDIATE`` transaction, so two sweeps on one database never run the same
run twice. A run left ``running`` can be taken over when its owner is gone: a dead pid on this host,
a released claim (Ctrl-C), or no heartbeat within the lease.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATUSES = ("running", "finished", "diverged", "failed")
DONE = ("finished", "diverged")  # a re-run skips these; "failed" is retried
METRICS = ("accuracy", "precision", "recall", "f1", "loss")
EPOCH_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
GRID_COLUMNS = ("data", "model", "method", "optimizer", "lr", "seed")
DEFAULT_LEASE_S = 6 * 3600.0

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    config TEXT NOT NULL,
    test_accuracy REAL, test_precision REAL, test_recall REAL, test_f1 REAL, test_loss REAL,
    best_epoch INTEGER, best_val_accuracy REAL, diverged_epoch INTEGER, error TEXT, run_dir TEXT,
    data TEXT, model TEXT, method TEXT, optimizer TEXT, lr REAL, seed INTEGER,
    started_at TEXT, finished_at TEXT, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, host TEXT, pid INTEGER, notes TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, lr REAL, seconds REAL,
    PRIMARY KEY (run_id, epoch)
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
    """Whether a process with this id exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` decided: ``taken`` is True when this process now owns the run."""

    taken: bool
    reason: str  # "new", "retry", "reclaimed", or why not: "finished", "diverged", "failed", "owned"
    attempts: int = 0


class Store:
    """A results database; one connection per instance (open one per process or thread).

    Args:
        path: the SQLite file; created with its tables if missing.
        lease_s: a ``running`` run whose last heartbeat is older than this may be taken over,
            wherever its owner runs (the pid check only works on the owner's own host).
        timeout_s: how long a write waits for another writer's lock.

    Examples:
        >>> with Store("runs.db") as store:  # doctest: +SKIP
        ...     store.claim(run_id, config).taken
    """

    def __init__(self, path: str | Path, *, lease_s: float = DEFAULT_LEASE_S, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_s = float(lease_s)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # isolation_level=None: we write our own BEGIN IMMEDIATE, so the lock is taken before the read
        # that decides a claim, not lazily at the first write.
        self.conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: could not switch the database to WAL mode (got {mode!r})")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(_SCHEMA)  # IF NOT EXISTS throughout: opening an existing store changes nothing
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns newer than a database's schema (ADD COLUMN keeps every row; a no-op when present)."""
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(runs)")}
        if "notes" not in have:
            with self._write() as c:
                if "notes" not in {r["name"] for r in c.execute("PRAGMA table_info(runs)")}:  # another opener won
                    c.execute("ALTER TABLE runs ADD COLUMN notes TEXT")

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front (``BEGIN IMMEDIATE``)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- sweeps -----------------------------------------------------------------------------------

    def add_sweep(self, sweep_id: str, name: str | None, grid: Mapping[str, Any], run_ids: Iterable[str]) -> None:
        """Record what a sweep asked for (again on every re-run; the first record stays)."""
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO sweeps (sweep_id, name, grid, run_ids, created_at) VALUES (?,?,?,?,?)",
                      (sweep_id, name, json.dumps(dict(grid)), json.dumps(list(run_ids)), _now()))

    def sweeps(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM sweeps ORDER BY created_at, sweep_id").fetchall()
        return [{**dict(r), "grid": json.loads(r["grid"]), "run_ids": json.loads(r["run_ids"])} for r in rows]

    # -- the life of a run ------------------------------------------------------------------------

    def _owner_gone(self, row: sqlite3.Row, now: float) -> bool:
        if row["pid"] is None:  # released by its owner (Ctrl-C)
            return True
        if row["host"] == self.host and not pid_alive(int(row["pid"])):
            return True
        beat = row["heartbeat_at"]
        return beat is None or now - float(beat) > self.lease_s

    def claim(self, run_id: str, config: Mapping[str, Any], *, retry_failed: bool = True) -> Claim:
        """Atomically take a run for this process, or say why not.

        A run nobody has started is inserted as ``running``. A ``finished`` or ``diverged`` run is
        never run again; a ``failed`` one is retried when ``retry_failed``; a ``running`` one is taken
        over only when its owner is gone (see the class docstring).
        """
        now = time.time()
        grid = [config.get(k) for k in GRID_COLUMNS]
        with self._write() as c:
            row = c.execute("SELECT status, host, pid, heartbeat_at, attempts FROM runs WHERE run_id=?",
                            (run_id,)).fetchone()
            if row is None:
                c.execute(
                    f"INSERT INTO runs (run_id, status, config, {', '.join(GRID_COLUMNS)}, started_at, heartbeat_at,"
                    " attempts, host, pid) VALUES (?, 'running', ?, ?,?,?,?,?,?, ?, ?, 1, ?, ?)",
                    (run_id, json.dumps(dict(config), sort_keys=True), *grid, _now(), now, self.host, self.pid))
                return Claim(True, "new", 1)
            status = row["status"]
            if status in DONE or (status == "failed" and not retry_failed):
                return Claim(False, status, row["attempts"])
            if status == "running" and not self._owner_gone(row, now):
                return Claim(False, "owned", row["attempts"])
            attempts = int(row["attempts"]) + 1
            c.execute(
                "UPDATE runs SET status='running', config=?, started_at=?, finished_at=NULL, heartbeat_at=?,"
                " attempts=?, host=?, pid=?, error=NULL WHERE run_id=?",
                (json.dumps(dict(config), sort_keys=True), _now(), now, attempts, self.host, self.pid, run_id))
            return Claim(True, "retry" if status == "failed" else "reclaimed", attempts)

    def add_epoch(self, run_id: str, row: Mapping[str, Any]) -> None:
        """Store one epoch's history row as it happens, and renew this process's lease on the run."""
        with self._write() as c:
            self._put_epoch(c, run_id, row)
            c.execute("UPDATE runs SET heartbeat_at=? WHERE run_id=? AND pid=?", (time.time(), run_id, self.pid))

    @staticmethod
    def _put_epoch(c: sqlite3.Connection, run_id: str, row: Mapping[str, Any]) -> None:
        c.execute(
            f"INSERT OR REPLACE INTO epochs (run_id, epoch, {', '.join(EPOCH_COLUMNS)}) VALUES (?, ?, ?,?,?,?,?,?)",
            (run_id, int(row["epoch"]), *(_finite_or_none(row.get(k)) for k in EPOCH_COLUMNS)))

    def finish(self, result: Any) -> None:
        """Record a :class:`RunResult`: status, test metrics, and its full history.

        The history in the result is the truth: it replaces whatever epochs were stored while the
        run went (a resumed or repeated run may have left rows past the end of this one).
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
            c.execute("DELETE FROM epochs WHERE run_id=?", (result.run_id,))
            for h in history:
                self._put_epoch(c, result.run_id, h)
            c.execute(
                "UPDATE runs SET status=?, test_accuracy=?, test_precision=?, test_recall=?, test_f1=?, test_loss=?,"
                " best_epoch=?, best_val_accuracy=?, diverged_epoch=?, error=?, run_dir=COALESCE(?, run_dir),"
                " finished_at=? WHERE run_id=?",
                (status, *(_finite_or_none(test.get(m)) for m in METRICS),
                 None if best_epoch is None else int(best_epoch), best_val,
                 getattr(result, "diverged_epoch", None), getattr(result, "error", None), run_dir, _now(),
                 result.run_id))

    def fail(self, run_id: str, error: str) -> None:
        """Mark a run ``failed`` with the error text (a traceback); the sweep goes on."""
        with self._write() as c:
            c.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?", (error, _now(), run_id))

    def add_note(self, run_id: str, text: str, *, new_attempt: bool = False) -> None:
        """Append a line to the run's ``notes``; ``new_attempt`` also counts one more attempt (a retry that
        the claim did not see, such as Ray re-running a task whose worker died)."""
        with self._write() as c:
            c.execute("UPDATE runs SET notes=CASE WHEN notes IS NULL OR notes='' THEN ? ELSE notes || char(10) || ? END,"
                      " attempts=attempts+? WHERE run_id=?", (text, text, int(new_attempt), run_id))

    def set_run_dir(self, run_id: str, run_dir: str | Path) -> None:
        with self._write() as c:
            c.execute("UPDATE runs SET run_dir=? WHERE run_id=?", (str(run_dir), run_id))

    def release(self, run_id: str) -> None:
        """Give a run back (Ctrl-C): it stays ``running`` with no owner, so the next sweep takes it over."""
        with self._write() as c:
            c.execute("UPDATE runs SET pid=NULL, heartbeat_at=NULL WHERE run_id=? AND status='running' AND pid=?",
                      (run_id, self.pid))

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
