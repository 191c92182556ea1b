"""A sweep: the grid datasets × models × methods × optimizers × learning rates × seeds, as RunConfigs.

A sweep comes from a TOML file or from command-line flags; both become a :class:`SweepConfig`, which
checks every key and value before anything runs and expands into one :class:`RunConfig` per point.

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
    data_root = "../shared/data"

The plural names of the flags (``datasets``, ``models``, ``methods``, ``optimizers``, ``lrs``,
``seeds``) are accepted in ``[grid]`` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from initscope.errors import SweepConfigError
from initscope.experiments.data import NORMALIZATIONS, SOURCES
from initscope.experiments.optim import OPTIMIZERS, SCHEDULES

# The grid's usual axes, in the order runs are listed (seed first: one complete pass over every other
# axis before the next seed, so an interrupted sweep already fills every table cell once).
AXES = ("seed", "data", "model", "method", "optimizer", "lr")
ALIASES = {"datasets": "data", "dataset": "data", "models": "model", "methods": "method",
           "optimizers": "optimizer", "lrs": "lr", "learning_rates": "lr", "seeds": "seed"}
TOP_KEYS = ("name", "db", "out", "grid", "run")


def _run_config_cls() -> type:
    from initscope.experiments.train import RunConfig

    return RunConfig


def run_fields() -> dict[str, dataclasses.Field]:
    """RunConfig's fields by name: the keys a sweep may set."""
    return {f.name: f for f in dataclasses.fields(_run_config_cls())}


def _check_choice(key: str, value: Any, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise SweepConfigError(f"{key}: unknown value {value!r}; valid: {', '.join(valid)}")


def _check_model(value: Any) -> None:
    if not isinstance(value, str):
        raise SweepConfigError(f"model: {value!r} is not a model name")
    if ":" in value:  # module:callable, imported when the run starts
        return
    from initscope import models

    listing = getattr(models, "list_models")
    own = list(listing())
    if value in own:
        return
    try:
        import torchvision

        if value in torchvision.models.list_models():
            return
    except (ImportError, AttributeError):
        pass
    raise SweepConfigError(f"model: unknown model {value!r}; valid: {', '.join(own)}, any torchvision "
                           "classification model name, or module:callable")


def _check_data(value: Any) -> None:
    if isinstance(value, str) and value.startswith("folder:") and len(value) > len("folder:"):
        if not Path(value[len("folder:"):]).is_dir():  # every run would fail on it: say so before the first
            raise SweepConfigError(f"data: {value}: no such directory (relative paths start where the sweep runs)")
        return
    _check_choice("data", value, SOURCES)


def _check_value(key: str, value: Any) -> Any:
    """Check one RunConfig value and return it in its canonical type (TOML ints for floats, and so on)."""
    from initscope.methods import METHODS

    if key == "method":
        _check_choice(key, value, METHODS)
    elif key == "optimizer":
        _check_choice(key, value, OPTIMIZERS)
    elif key == "schedule":
        _check_choice(key, value, SCHEDULES)
    elif key == "normalize":
        _check_choice(key, value, NORMALIZATIONS)
    elif key == "data":
        _check_data(value)
    elif key == "model":
        _check_model(value)
    elif key in ("lr", "step_gamma", "weight_decay"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SweepConfigError(f"{key}: {value!r} is not a number")
        value = float(value)
        if key == "lr" and not value > 0:
            raise SweepConfigError(f"lr: {value!r} must be > 0")
        if value < 0:
            raise SweepConfigError(f"{key}: {value!r} must be >= 0")
    elif key in ("epochs", "batch_size", "width", "seed", "probe_every", "limit", "image_size"):
        if value is None and key in ("limit", "image_size"):
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepConfigError(f"{key}: {value!r} is not an integer")
        low = 0 if key in ("seed", "probe_every") else 1
        if value < low:
            raise SweepConfigError(f"{key}: {value!r} must be >= {low}")
    elif key == "step_epochs":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise SweepConfigError(f"step_epochs: {value!r} is not a list of epoch numbers")
        value = tuple(value)
    return value


def _lr_by_optimizer(table: Mapping[str, Any]) -> dict[str, list[float]]:
    """``lr = { adam = [1e-3], sgd = [0.01, 0.1] }``: learning rates per optimizer, checked."""
    out: dict[str, list[float]] = {}
    for opt, values in table.items():
        _check_choice("lr: optimizer", opt, OPTIMIZERS)
        values = values if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise SweepConfigError(f"grid: lr for {opt} has no values")
        out[opt] = list(dict.fromkeys(_check_value("lr", v) for v in values))
    if not out:
        raise SweepConfigError("grid: lr has no values")
    return out


def _canonical_key(key: str, where: str, valid: Iterable[str]) -> str:
    key = ALIASES.get(key, key)
    valid = tuple(valid)
    if key not in valid:
        raise SweepConfigError(f"{where}: unknown key {key!r}; valid: {', '.join(valid)}")
    return key


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

    def __post_init__(self) -> None:
        fields = run_fields()
        grid: dict[str, list[Any]] = {}
        for key, values in self.grid.items():
            key = _canonical_key(key, "grid", fields)
            if key == "lr" and isinstance(values, Mapping):
                grid["lr"] = _lr_by_optimizer(values)
                continue
            if not isinstance(values, (list, tuple)):
                values = [values]
            if not values:
                raise SweepConfigError(f"grid: {key} has no values")
            if key in grid:
                raise SweepConfigError(f"grid: {key} is given twice (once under an alias?)")
            seen: list[Any] = []
            for v in values:
                v = _check_value(key, v)
                if v not in seen:
                    seen.append(v)
            grid[key] = seen
        fixed: dict[str, Any] = {}
        for key, value in self.fixed.items():
            key = _canonical_key(key, "run", fields)
            if key in grid:
                raise SweepConfigError(f"{key} is set both in [grid] and in [run]; keep one")
            fixed[key] = _check_value(key, value)
        if isinstance(grid.get("lr"), dict):
            opts = grid.get("optimizer", [fixed.get("optimizer", run_fields()["optimizer"].default)])
            missing = [o for o in opts if o not in grid["lr"]]
            if missing:
                raise SweepConfigError(f"grid: lr has no values for optimizer(s) {', '.join(missing)}; "
                                       f"it has: {', '.join(grid['lr'])}")
        self.grid, self.fixed = grid, fixed
        self.db, self.out = Path(self.db), Path(self.out)

    # -- constructors -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "SweepConfig":
        """From the parsed TOML document (``name``, ``db``, ``out``, ``[grid]``, ``[run]``)."""
        for key in d:
            if key not in TOP_KEYS:
                raise SweepConfigError(f"unknown top-level key {key!r}; valid: {', '.join(TOP_KEYS)} "
                                       "(run settings go under [grid] or [run])")
        grid, fixed = d.get("grid", {}), d.get("run", {})
        for name, table in (("grid", grid), ("run", fixed)):
            if not isinstance(table, Mapping):
                raise SweepConfigError(f"[{name}] must be a table of key = value lines, not {table!r}")
        return cls(grid=dict(grid), fixed=dict(fixed), db=Path(d.get("db", "runs.db")),
                   out=Path(d.get("out", "runs")), name=d.get("name"))

    @classmethod
    def from_toml(cls, path: str | Path) -> "SweepConfig":
        """Read a sweep from a TOML file (see the module docstring for the format)."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise SweepConfigError(f"no sweep config at {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SweepConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            cfg = cls.from_mapping(doc)
        except SweepConfigError as exc:
            raise SweepConfigError(f"{path}: {exc}") from None
        if cfg.name is None:
            cfg.name = path.stem
        return cfg

    @classmethod
    def from_flags(cls, *, grid: Mapping[str, str | None], fixed: Mapping[str, Any],
                   db: str | Path = "runs.db", out: str | Path = "runs", name: str | None = None) -> "SweepConfig":
        """From command-line text: ``grid`` values are comma-separated strings (``"1e-3,1e-2"``)."""
        fields = run_fields()
        parsed: dict[str, list[Any]] = {}
        for key, text in grid.items():
            if text is None:
                continue
            key = _canonical_key(key, "grid", fields)
            parsed[key] = [_parse_scalar(key, s) for s in split_list(text)]
        return cls(grid=parsed, fixed={k: v for k, v in fixed.items() if v is not None}, db=Path(db),
                   out=Path(out), name=name)

    # -- what it runs -----------------------------------------------------------------------------

    def axes(self) -> list[str]:
        """The grid's axes in expansion order (outermost first)."""
        return [a for a in AXES if a in self.grid] + [a for a in self.grid if a not in AXES]

    def expand(self) -> list[Any]:
        """One RunConfig per grid point (duplicates by run_id dropped), seed outermost."""
        cls = _run_config_cls()
        axes = self.axes()
        lr_table = self.grid.get("lr") if isinstance(self.grid.get("lr"), dict) else None
        if lr_table is not None:  # the learning rates depend on the optimizer: expand them last
            axes = [a for a in axes if a != "lr"]
        default_opt = self.fixed.get("optimizer", run_fields()["optimizer"].default)
        runs: dict[str, Any] = {}
        for values in itertools.product(*(self.grid[a] for a in axes)):
            point = {**self.fixed, **dict(zip(axes, values))}
            lrs = [point.get("lr")] if lr_table is None else lr_table[point.get("optimizer", default_opt)]
            for lr in lrs:
                d = dict(point) if lr_table is None else {**point, "lr": lr}
                try:
                    cfg = cls.from_dict(d)
                except (ValueError, TypeError) as exc:
                    raise SweepConfigError(f"run {d}: {exc}") from None
                runs.setdefault(cfg.run_id, cfg)
        return list(runs.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the report's "what was run" section shows."""
        return {"name": self.name, "db": str(self.db), "out": str(self.out),
                "grid": {k: dict(v) if isinstance(v, dict) else list(v) for k, v in self.grid.items()},
                "run": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}}

    @property
    def sweep_id(self) -> str:
        """A stable hash of the grid and the fixed settings (not of where results go)."""
        d = self.to_dict()
        text = json.dumps({"grid": d["grid"], "run": d["run"]}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def split_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


_FLOAT_KEYS = ("lr", "step_gamma", "weight_decay")
_INT_KEYS = ("seed", "epochs", "batch_size", "width", "probe_every", "limit", "image_size")


def _parse_scalar(key: str, text: str) -> Any:
    converters: dict[str, Callable[[str], Any]] = {**dict.fromkeys(_FLOAT_KEYS, float),
                                                   **dict.fromkeys(_INT_KEYS, int)}
    conv = converters.get(key)
    if conv is None:
        return text
    try:
        return conv(text)
    except ValueError:
        kind = "a number" if conv is float else "an integer"
        raise SweepConfigError(f"{key}: {text!r} is not {kind}") from None
