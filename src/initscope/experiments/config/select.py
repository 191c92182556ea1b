"""``[select]``: a setting chosen on validation, then more seeds at the choice (the papers' protocol).

A sweep file may hold::

    [select]
    axis = "lr"                         # a [grid] key (not seed)
    by = "best validation accuracy"     # the score of a run: its best validation accuracy over epochs
    seeds = [0, 1, 2, 3, 4]

The grid then runs with the first seed only: these are the *selection runs*. They fall into *groups*, the
runs that differ only in ``axis`` (same data, model, method, optimizer, ...). Once every run of a group is
done (finished or diverged), the group's value of ``axis`` is the one whose run scored best (a diverged
run scores the best validation accuracy it reached, nothing if it diverged in its first epoch; a tie goes to
the value listed first); the choice is recorded in the results store (table ``selections``) and never
made again. Then the remaining seeds run at the chosen value. The selection run at the chosen value is the
first of the group's seeds, so each group ends with ``len(seeds)`` runs at its chosen value, and its
runs at the other values are selection runs only: the report leaves them out of its tables and lists them
in a table of its own.

A group is identified by its settings (every field of the run's id but ``axis`` and the seed), not by the
sweep: two sweeps with the same group (the poster's Table 2 and the Adam row of its Table 3) share the
selection runs, the choice and the runs after it.

Selection is on validation; the tables report test accuracy at the best-validation checkpoint, so the
test split never takes part in a choice.

A choice at the grid's edge that beat its neighbour (:func:`grid_edge`) says the best value may lie beyond
the grid; ``--dry-run`` and the report flag it. A later sweep with the grid widened on that side makes a
new group (its candidate values differ): only the new values train, the choice is made anew among all of
them, and the report takes the latest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from initscope.errors import ConfigError
from initscope.experiments.config.run import ALIASES, RUN_SCHEMA, RunConfig

SELECT_BY = ("best validation accuracy",)
SELECT_KEYS = ("axis", "by", "seeds")


@dataclass(frozen=True)
class Select:
    """What ``[select]`` asks for: choose ``axis`` per group ``by`` a validation score of the first seed's
    runs, then run the other ``seeds`` at the choice."""

    axis: str
    seeds: tuple[int, ...]
    by: str = SELECT_BY[0]

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], grid: Mapping[str, Any]) -> "Select":
        """From the ``[select]`` table, checked against the sweep's (canonical) ``grid``."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"[select] must be a table of key = value lines, not {d!r}")
        unknown = sorted(set(d) - set(SELECT_KEYS))
        if unknown:
            raise ConfigError(f"select: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(SELECT_KEYS)}")
        for key in ("axis", "seeds"):
            if key not in d:
                raise ConfigError(f"select: needs {key} (e.g. axis = \"lr\", seeds = [0, 1, 2])")
        axis, by = d["axis"], d.get("by", SELECT_BY[0])
        axis = ALIASES.get(axis, axis) if isinstance(axis, str) else axis
        if axis == "seed":
            raise ConfigError("select: axis cannot be the seed: the seeds are what runs after the choice")
        if axis not in grid:
            raise ConfigError(f"select: axis {axis!r} is not a [grid] key; the grid has: {', '.join(grid) or 'none'}")
        if by not in SELECT_BY:
            raise ConfigError(f"select: by: unknown value {by!r}; valid: {', '.join(map(repr, SELECT_BY))}")
        if "seed" in grid:
            raise ConfigError("grid: seed is set by [select] seeds (the first seed runs the grid, the others the "
                              "choice); remove it from [grid]")
        seeds = d["seeds"]
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ConfigError(f"select: seeds must be a non-empty list of seeds, got {seeds!r}")
        seeds = tuple(dict.fromkeys(RUN_SCHEMA.validate("seed", s) for s in seeds))
        return cls(axis, seeds, by)

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "by": self.by, "seeds": list(self.seeds)}

    # -- groups -----------------------------------------------------------------------------------------

    def group(self, cfg: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
        """The settings that define ``cfg``'s group: its id's fields but the axis and the seed."""
        if not isinstance(cfg, RunConfig):
            cfg = RunConfig.from_dict(dict(cfg))
        return {k: v for k, v in cfg.id_fields().items() if k not in (self.axis, "seed")}

    def group_id(self, cfg: RunConfig | Mapping[str, Any], values: Iterable[Any]) -> str:
        """A stable hash of the group, of its candidate ``values`` of the axis, of ``axis`` and ``by``: the key
        of its choice in the store (two sweeps share a choice only where they choose among the same values)."""
        doc = {"group": self.group(cfg), "axis": self.axis, "by": self.by,
               "values": sorted(json.dumps(v) for v in values)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def after_choice(self, chosen: RunConfig) -> list[RunConfig]:
        """The runs at a group's chosen value with the seeds after the first."""
        return [dataclasses.replace(chosen, seed=s) for s in self.seeds[1:]]

    def choose(self, candidates: Sequence[tuple[Any, float | None]]) -> tuple[Any, list[dict[str, Any]]]:
        """The value with the best score among ``(value, score)`` in the grid's order (a score None, a run with
        no validation epoch, never wins over a number; a tie goes to the value listed first), and the scores
        as recorded."""
        best, best_score = None, -math.inf
        for value, score in candidates:
            s = -math.inf if score is None or not math.isfinite(score) else float(score)
            if best is None or s > best_score:
                best, best_score = value, s
        return best, [{"value": v, "score": sc} for v, sc in candidates]


def selection_plan(select: Select, runs: Iterable[RunConfig]) -> dict[str, list[RunConfig]]:
    """The selection runs by group id, each group's runs in the grid's order of the axis."""
    groups: dict[str, list[RunConfig]] = {}
    for cfg in runs:
        groups.setdefault(json.dumps(select.group(cfg), sort_keys=True), []).append(cfg)
    return {select.group_id(members[0], [getattr(c, select.axis) for c in members]): members
            for members in groups.values()}


def grid_edge(selection: Mapping[str, Any]) -> str:
    """``"top"`` or ``"bottom"`` where a selection chose the largest or smallest numeric value of its grid and
    that value scored strictly better than its neighbour (the best value may lie beyond the grid); else ``""``.
    A choice at an edge tied with its neighbour (every run at chance, say) is not flagged."""
    scores = [(c["value"], c.get("score")) for c in selection["scores"]]
    if len(scores) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in scores):
        return ""
    ordered = sorted(scores, key=lambda vs: vs[0])
    score = lambda s: -math.inf if s is None or not math.isfinite(float(s)) else float(s)  # noqa: E731
    for edge, (value, s), (_, neighbour) in (("bottom", ordered[0], ordered[1]), ("top", ordered[-1], ordered[-2])):
        if value == selection["chosen"] and score(s) > score(neighbour):
            return edge
    return ""
