"""A sweep: the grid datasets × models × methods × optimizers × learning rates × seeds, as RunConfigs.

A sweep comes from a TOML file or from command-line flags; both become a :class:`SweepConfig`, which
checks every key and value (against :data:`~initscope.experiments.config.run.RUN_SCHEMA`, the one
description of a run's fields) before anything runs, and expands into one RunConfig per point.

The TOML form (relative paths are taken from the directory the command runs in)::

    name = "poster-table1-small"
    db = "runs/poster.db"          # the results store (SQLite)
    out = "runs/poster"            # run folders: checkpoints, splits, probe frames

    [grid]                         # every combination is one run; any RunConfig field may vary
    data = ["fashion-mnist"]
    model = ["plain34"]
    method = ["xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward"]
    optimizer = ["adam"]
    lr = [1e-3]
    seed = [0, 1, 2]

    [run]                          # the same for every run: any RunConfig field
    width = 8
    epochs = 2

The plural names of the flags (``datasets``, ``models``, ``methods``, ``optimizers``, ``lrs``,
``seeds``) are accepted in ``[grid]`` too. A ``[select]`` table makes the sweep choose one axis (the
learning rate) per group on validation, then run more seeds at the choice (:mod:`.select`).
Where the data lie is the user's, not the file's: pass
``--data-root`` (or set ``data_root``) for the torchvision sets and relative ``folder:`` paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initscope.errors import ConfigError
from initscope.experiments.config.run import ALIASES, RUN_SCHEMA, RunConfig
from initscope.experiments.config.select import Select

# The grid's usual axes, in the order runs are listed (seed first: one complete pass over every other
# axis before the next seed, so an interrupted sweep already fills every table cell once).
AXES = ("seed", "data", "model", "method", "optimizer", "lr")
TOP_KEYS = ("name", "db", "out", "grid", "run", "select")
# The methods a sweep compares when none are named: the five of the papers.
PAPER_METHODS = ("xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward")


def load_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML document at ``path``; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a sweep TOML file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no sweep config at {path}") from None
    except UnicodeDecodeError as exc:  # a binary file: tomllib reads UTF-8 text only
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text: byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def default_grid() -> dict[str, list[Any]]:
    """The grid of a sweep given no file: every axis at RunConfig's default, the papers' five methods."""
    grid = {a: [RUN_SCHEMA.default(a)] for a in ("data", "model", "optimizer", "lr", "seed")}
    return {**grid, "method": list(PAPER_METHODS)}


def _canonical_key(key: str, where: str) -> str:
    key = ALIASES.get(key, key)
    if key not in RUN_SCHEMA.fields:
        raise ConfigError(f"{where}: unknown key {key!r}; valid: {', '.join(RUN_SCHEMA.names())}")
    return key


def _lr_by_optimizer(table: Mapping[str, Any]) -> dict[str, list[float]]:
    """``lr = { adam = [1e-3], sgd = [0.01, 0.1] }``: learning rates per optimizer, checked."""
    optimizers = RUN_SCHEMA.valid_values("optimizer")
    out: dict[str, list[float]] = {}
    for opt, values in table.items():
        if opt not in optimizers:
            raise ConfigError(f"lr: optimizer: unknown value {opt!r}; valid: {', '.join(optimizers)}")
        values = values if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"grid: lr for {opt} has no values")
        out[opt] = list(dict.fromkeys(RUN_SCHEMA.validate("lr", v) for v in values))
    if not out:
        raise ConfigError("grid: lr has no values")
    return out


@dataclass
class SweepConfig:
    """What a sweep runs: ``grid`` (RunConfig field -> list of values) over ``fixed`` (field -> value).

    Build it with :meth:`from_toml`, :meth:`from_mapping` or :meth:`from_flags`; they check every key
    and value. :meth:`expand` gives the runs.
    """

    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    db: Path = Path("runs.db")
    out: Path = Path("runs")
    name: str | None = None
    select: Select | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        grid: dict[str, Any] = {}
        for key, values in self.grid.items():
            key = _canonical_key(key, "grid")
            if key in grid:
                raise ConfigError(f"grid: {key} is given twice (once under an alias?)")
            if key == "lr" and isinstance(values, Mapping):
                grid["lr"] = _lr_by_optimizer(values)
                continue
            if not isinstance(values, (list, tuple)):
                values = [values]
            if not values:
                raise ConfigError(f"grid: {key} has no values")
            grid[key] = list(dict.fromkeys(RUN_SCHEMA.validate(key, v) for v in values))
        fixed: dict[str, Any] = {}
        for key, value in self.fixed.items():
            key = _canonical_key(key, "run")
            if key in grid:
                raise ConfigError(f"{key} is set both in [grid] and in [run]; keep one")
            fixed[key] = RUN_SCHEMA.validate(key, value)
        if isinstance(grid.get("lr"), dict):
            opts = grid.get("optimizer", [fixed.get("optimizer", RUN_SCHEMA.default("optimizer"))])
            missing = [o for o in opts if o not in grid["lr"]]
            if missing:
                raise ConfigError(f"grid: lr has no values for optimizer(s) {', '.join(missing)}; "
                                  f"it has: {', '.join(grid['lr'])}")
        self.grid, self.fixed = grid, fixed
        self.db, self.out = Path(self.db), Path(self.out)
        if self.select is not None and not isinstance(self.select, Select):
            self.select = Select.from_mapping(self.select, grid)
        if isinstance(self.select, Select) and "seed" in fixed:
            raise ConfigError("run: seed is set by [select] seeds; remove it from [run]")

    # -- constructors -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "SweepConfig":
        """From the parsed TOML document (``name``, ``db``, ``out``, ``[grid]``, ``[run]``)."""
        for key in d:
            if key not in TOP_KEYS:
                raise ConfigError(f"unknown top-level key {key!r}; valid: {', '.join(TOP_KEYS)} "
                                  "(run settings go under [grid] or [run])")
        grid, fixed = d.get("grid", {}), d.get("run", {})
        for name, table in (("grid", grid), ("run", fixed)):
            if not isinstance(table, Mapping):
                raise ConfigError(f"[{name}] must be a table of key = value lines, not {table!r}")
        return cls(grid=dict(grid), fixed=dict(fixed), db=Path(d.get("db", "runs.db")),
                   out=Path(d.get("out", "runs")), name=d.get("name"), select=d.get("select"))

    @classmethod
    def from_toml(cls, path: str | Path) -> "SweepConfig":
        """Read a sweep from a TOML file (see the module docstring for the format)."""
        path = Path(path)
        doc = load_toml(path)
        try:
            cfg = cls.from_mapping(doc)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if cfg.name is None:
            cfg.name = path.stem
        return cfg

    @classmethod
    def from_flags(cls, *, grid: Mapping[str, str | None], fixed: Mapping[str, Any],
                   db: str | Path = "runs.db", out: str | Path = "runs", name: str | None = None) -> "SweepConfig":
        """From command-line text: ``grid`` values are comma-separated strings (``"1e-3,1e-2"``)."""
        parsed: dict[str, list[Any]] = {}
        for key, text in grid.items():
            if text is None:
                continue
            key = _canonical_key(key, "grid")
            parsed[key] = [RUN_SCHEMA.from_text(key, s) for s in split_list(text)]
        return cls(grid=parsed, fixed={k: v for k, v in fixed.items() if v is not None}, db=Path(db),
                   out=Path(out), name=name)

    def override(self, other: "SweepConfig") -> None:
        """Take ``other``'s settings over this sweep's: a grid axis replaces the axis (and a fixed value
        of that key), a fixed value replaces the value (and an axis of that key)."""
        for k, v in other.grid.items():
            if k == "seed" and isinstance(self.select, Select):  # --seeds: the seeds of the selection protocol
                self.select = dataclasses.replace(self.select, seeds=tuple(v))
                continue
            self.fixed.pop(k, None)
            self.grid[k] = v
        for k, v in other.fixed.items():
            self.grid.pop(k, None)
            self.fixed[k] = v

    # -- what it runs -----------------------------------------------------------------------------

    def axes(self) -> list[str]:
        """The grid's axes in expansion order (outermost first)."""
        return [a for a in AXES if a in self.grid] + [a for a in self.grid if a not in AXES]

    def expand(self) -> list[RunConfig]:
        """One RunConfig per grid point (duplicates by run_id dropped), seed outermost. With ``[select]``: the
        selection runs (the grid at the first seed); the runs after each choice come from the engine."""
        if isinstance(self.select, Select):
            plain = SweepConfig(grid={**self.grid, "seed": [self.select.seeds[0]]}, fixed=self.fixed)
            return plain.expand()
        axes = self.axes()
        lr_table = self.grid.get("lr") if isinstance(self.grid.get("lr"), dict) else None
        if lr_table is not None:  # the learning rates depend on the optimizer: expand them last
            axes = [a for a in axes if a != "lr"]
        default_opt = self.fixed.get("optimizer", RUN_SCHEMA.default("optimizer"))
        runs: dict[str, RunConfig] = {}
        for values in itertools.product(*(self.grid[a] for a in axes)):
            point = {**self.fixed, **dict(zip(axes, values))}
            lrs = [point.get("lr")] if lr_table is None else lr_table[point.get("optimizer", default_opt)]
            for lr in lrs:
                d = dict(point) if lr_table is None else {**point, "lr": lr}
                try:
                    cfg = RunConfig.from_dict(d)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"run {d}: {exc}") from None
                runs.setdefault(cfg.run_id, cfg)
        return list(runs.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the report's "what was run" section shows."""
        d = {"name": self.name, "db": str(self.db), "out": str(self.out),
             "grid": {k: dict(v) if isinstance(v, dict) else list(v) for k, v in self.grid.items()},
             "run": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}}
        if isinstance(self.select, Select):
            d["select"] = self.select.to_dict()
        return d

    @property
    def sweep_id(self) -> str:
        """A stable hash of the grid, the fixed settings and the selection (not of where results go)."""
        d = self.to_dict()
        key = {"grid": d["grid"], "run": d["run"], **({"select": d["select"]} if "select" in d else {})}
        text = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def axis_sizes(grid: Mapping[str, Iterable[Any]]) -> str:
    """``data (1), method (5), ...``: how many values each axis of a grid has."""
    return ", ".join(f"{k} ({sum(map(len, v.values())) if isinstance(v, dict) else len(list(v))})"
                     for k, v in grid.items())
