"""The options ``plan`` and ``init_`` take, validated with errors that list the valid values."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from initscope.graph.propagate import ON_UNKNOWN
from initscope.sampling import DISTRIBUTIONS

# Fans: "true" counts groups as they are; "framework" as torch.nn.init does (initscope.methods.base.Layer.fans).
FANS = ("true", "framework")
# Residual policies (initscope.methods.residual).
POLICIES = ("none", "scale", "zero")


def _number(value: object) -> bool:
    """A real, finite number, and not a bool (``True`` is an int to Python, never a ratio to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Options:
    """Options of a plan.

    Attributes:
        distribution: ``normal``, ``uniform`` or ``truncated_normal``; None for the method's default.
        max_std_ratio: the ASV clamp, σ ≤ ratio × (the ASV formula with τ or γ = 1/2); None disables it.
        fan: ``true`` (group-aware fans) or ``framework`` (the fans torch.nn.init computes).
        residual: ``none``, ``scale`` or ``zero`` (see :mod:`initscope.methods.residual`); None for the
            method's default.
        residual_growth: the total growth the ``scale`` policy allows over all residual adds.
        on_unknown: what an op with no rule becomes: ``error``, ``skip`` (identity) or ``kaiming`` (a ReLU).
        max_cov_positions: spatial maps up to this many positions carry their full covariance.
    """

    distribution: str | None = None
    max_std_ratio: float | None = 3.0
    fan: str = "true"
    residual: str | None = None
    residual_growth: float = 2.0
    on_unknown: str = "error"
    max_cov_positions: int = 64

    @staticmethod
    def make(**kwargs) -> "Options":
        valid = {f.name for f in fields(Options)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid options: {sorted(valid)}")
        opts = Options(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.distribution is not None and self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={self.distribution!r} is not one of {DISTRIBUTIONS}")
        if self.max_std_ratio is not None and not (_number(self.max_std_ratio) and self.max_std_ratio > 0):
            raise ValueError(f"max_std_ratio={self.max_std_ratio!r} must be a positive finite number or None")
        if self.fan not in FANS:
            raise ValueError(f"fan={self.fan!r} is not one of {FANS}")
        if self.residual is not None and self.residual not in POLICIES:
            raise ValueError(f"residual={self.residual!r} is not one of {POLICIES}")
        if not (_number(self.residual_growth) and self.residual_growth >= 1):
            raise ValueError(f"residual_growth={self.residual_growth!r} must be a finite number >= 1 (the total growth "
                             "of the signal over all residual adds; 2 by default)")
        if self.on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown={self.on_unknown!r} is not one of {ON_UNKNOWN}")
        if isinstance(self.max_cov_positions, bool) or not (
                isinstance(self.max_cov_positions, int) and self.max_cov_positions >= 1):
            raise ValueError(f"max_cov_positions={self.max_cov_positions!r} must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)
