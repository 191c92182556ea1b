"""A results store as pandas frames: runs (one row each, every config key a ``cfg_<key>`` column), epochs,
sweeps; and the selection of runs by their config (``--where``). Read-only: the store is never changed."""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from initscope.errors import StoreError


def load_runs(db: str | Path) -> pd.DataFrame:
    """Every run of a store, one row each: the ``runs`` columns, ``config`` parsed, each config key as a
    ``cfg_<key>`` column, and ``best_val`` (the run's best validation accuracy over its epochs). A config
    written before a field existed reads as that field's default (a run before ``augment`` had none)."""
    with connect(db) as conn:
        runs = pd.read_sql_query("SELECT * FROM runs ORDER BY started_at, run_id", conn)
        best = pd.read_sql_query("SELECT run_id, MAX(val_accuracy) AS best_val, COUNT(*) AS n_epochs "
                                 "FROM epochs GROUP BY run_id", conn)
    runs = runs.merge(best, on="run_id", how="left")
    configs = [_with_defaults(json.loads(c)) for c in runs["config"]]
    runs["config"] = configs
    keys = list(dict.fromkeys(k for c in configs for k in c))
    for k in keys:
        runs[f"cfg_{k}"] = [_hashable(c.get(k)) for c in configs]
    return runs


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    from initscope.experiments.config import RUN_SCHEMA

    if "method" not in config:  # not a run's config (a test's stand-in): as it is
        return config
    for name in RUN_SCHEMA.names():
        default = RUN_SCHEMA.default(name)
        config.setdefault(name, list(default) if isinstance(default, tuple) else default)
    return config


def load_selections(db: str | Path) -> list[dict[str, Any]]:
    """The ``[select]`` choices a store recorded (empty for a store without any, or older than them)."""
    with connect(db) as conn:
        try:
            rows = conn.execute("SELECT group_id, axis, by, grp, chosen, scores, sweep_id, decided_at FROM selections "
                                "ORDER BY decided_at, group_id").fetchall()
        except sqlite3.OperationalError:
            return []
    return [{"group_id": r[0], "axis": r[1], "by": r[2], "group": json.loads(r[3]), "chosen": json.loads(r[4]),
             "scores": json.loads(r[5]), "sweep_id": r[6], "decided_at": r[7]} for r in rows]


def load_epochs(db: str | Path) -> pd.DataFrame:
    with connect(db) as conn:
        return pd.read_sql_query("SELECT * FROM epochs ORDER BY run_id, epoch", conn)


def load_sweeps(db: str | Path) -> list[dict[str, Any]]:
    with connect(db) as conn:
        try:
            rows = conn.execute("SELECT sweep_id, name, grid, run_ids, created_at FROM sweeps "
                                "ORDER BY created_at").fetchall()
        except sqlite3.OperationalError:  # a store written before sweeps were recorded
            return []
    return [{"sweep_id": r[0], "name": r[1], "grid": json.loads(r[2]), "run_ids": json.loads(r[3]),
             "created_at": r[4]} for r in rows]


def _uri(path: Path, **params: str) -> str:
    # a path is quoted for a URI: '?' or '#' in a folder name would otherwise start the query
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


class connect:
    """Read-only connection to a results store as a context manager (closes, unlike sqlite3's own).

    On a read-only mount a WAL database cannot be opened in SQLite's read-only mode (it would create its
    ``-shm`` index beside the file); nobody can be writing there, so the file is then read as immutable.

    Raises:
        FileNotFoundError: no file at ``db``.
        StoreError: a folder, not an SQLite file, damaged, or not an initscope store (no ``runs`` table).
    """

    def __init__(self, db: str | Path) -> None:
        path = Path(db)
        if path.is_dir():
            raise StoreError(f"{path} is a folder, not a results database; give the database's file")
        if not path.is_file():
            raise FileNotFoundError(f"no results database at {path}")
        self.conn = sqlite3.connect(_uri(path, mode="ro"), uri=True)
        try:
            tables = self._tables()
        except sqlite3.OperationalError as exc:
            if "unable to open" not in str(exc):
                raise self._unusable(path, exc) from None
            self.conn.close()
            self.conn = sqlite3.connect(_uri(path, mode="ro", immutable="1"), uri=True)
            try:
                tables = self._tables()
            except sqlite3.DatabaseError as exc2:
                raise self._unusable(path, exc2) from None
        except sqlite3.DatabaseError as exc:
            raise self._unusable(path, exc) from None
        if "runs" not in tables:
            self.conn.close()
            what = f"its tables: {', '.join(sorted(tables))}" if tables else "it has no tables"
            raise StoreError(f"{path}: an SQLite database, but not an initscope results store ({what}); give the "
                             "database a sweep wrote (--db)")

    def _tables(self) -> set[str]:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        problems = [r[0] for r in self.conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:  # a truncated file can still list its tables
            raise sqlite3.DatabaseError(f"damaged: {problems[0]}")
        return tables

    def _unusable(self, path: Path, exc: Exception) -> StoreError:
        self.conn.close()
        return StoreError(f"{path}: not a readable results database (SQLite: {exc}); it was left as it was")

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def varying_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys that take more than one value among these runs (``device`` and ``workers``, which do not change a
    result, never count)."""
    keys = [c[4:] for c in runs.columns if c.startswith("cfg_") and c not in ("cfg_device", "cfg_workers")]
    return [k for k in keys if runs[f"cfg_{k}"].astype(str).nunique(dropna=False) > 1]



def select_runs(runs: pd.DataFrame, where: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    """The runs whose config matches ``where`` (key -> accepted values, compared as text)."""
    keys = [c[4:] for c in runs.columns if c.startswith("cfg_")]
    for i, (key, values) in enumerate(where.items()):
        if key not in keys:
            raise ValueError(f"where: unknown key {key!r}; valid: {', '.join(keys)}")
        accepted = {str(v) for v in values}
        col = runs[f"cfg_{key}"]
        # 1e-3 and 0.001 are one learning rate: compare numbers as numbers where both sides are
        nums = pd.to_numeric(col, errors="coerce")
        num_accepted = {float(v) for v in accepted if is_number(v)}
        kept = runs[col.astype(str).isin(accepted) | nums.isin(num_accepted)]
        if kept.empty and not runs.empty:
            # An empty report is never what was asked for: most often a typo or a sweep not run yet.
            present = sorted(col.astype(str).unique())
            raise ValueError(f"where: no run has {key} in {', '.join(sorted(accepted))}; the runs"
                             f"{' the filters before it kept' if i else ''} have {key}: {', '.join(present)}")
        runs = kept
    return runs


def selections_where(selections: Sequence[Mapping[str, Any]],
                     where: Mapping[str, Sequence[Any]] | None) -> list[Mapping[str, Any]]:
    """The ``[select]`` choices of the runs that ``where`` keeps (as :func:`select_runs`): a choice is made
    for a group of settings, and one whose group has a ``where`` key at another value is another table's.
    A report restricted to the poster's Table 1 (plain34) in a database that Table 2's plain50 shares then
    lists and applies only Table 1's choices."""
    if not where:
        return list(selections)

    def accepted(value: Any, values: Sequence[Any]) -> bool:
        texts = {str(v) for v in values}
        if str(value) in texts:
            return True
        numbers = {float(v) for v in texts if is_number(v)}
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in numbers

    return [s for s in selections
            if all(key not in s["group"] or accepted(s["group"][key], values) for key, values in where.items())]


def is_number(text: Any) -> bool:
    """Whether ``text`` reads as a number (``float(text)`` succeeds)."""
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
