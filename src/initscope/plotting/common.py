"""What every figure shares: saving to PNG and SVG, and reading the probe's table.

Figures are built on a bare :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot): nothing is
kept in a global figure registry, so nothing has to be closed and no screen is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

DPI = 100

# The quantities of the probe's table, in the order of the forward and then the backward pass.
QUANTITIES = ("weight", "output", "activation", "output_grad", "input_grad", "weight_grad")
LABELS = {
    "weight": "weights",
    "output": "layer outputs (pre-activation)",
    "activation": "activation outputs",
    "output_grad": "gradients at layer outputs",
    "input_grad": "gradients at layer inputs",
    "weight_grad": "weight gradients",
}
_SUFFIXES = ("", ".png", ".svg")


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, sized in inches, at the house DPI."""
    return Figure(figsize=(width, height), dpi=DPI)


def save_figure(fig: Figure, path: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as PNG and SVG beside each other; returns ``(png, svg)``.

    ``path`` may carry no suffix, ``.png`` or ``.svg``: both files are written either way, with the
    suffix replaced. The folder is created if missing.
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"path={str(path)!r}: the suffix must be one of none, .png or .svg (both are written)")
    stem = path.with_suffix("") if path.suffix else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    fig.savefig(png, dpi=DPI)
    # Text stays text in the SVG (searchable, and far quicker to write than glyphs turned into paths).
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(svg)
    return png, svg


def check_columns(frame, needed: Sequence[str], what: str) -> None:
    """Raise a ValueError naming the columns ``what`` needs and the frame lacks."""
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs the probe table's columns {missing}; the frame has {list(frame.columns)}")


def with_method(frame):
    """The frame with a ``method`` column: a single probe's frame is one method named ``""``."""
    if "method" in frame.columns:
        return frame
    out = frame.copy()
    out.insert(0, "method", "")
    return out


def methods_of(frame) -> list[str]:
    """The methods, in order of first appearance."""
    return list(dict.fromkeys(frame["method"].astype(str)))


def layers_in_order(frame) -> list[str]:
    """Layer names ordered by their first call in the forward pass (the smallest ``index`` seen)."""
    first = frame.groupby("layer", sort=False)["index"].min().sort_values(kind="stable")
    return list(first.index)


def check_quantity(quantity: str) -> None:
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity={quantity!r} is not one of {QUANTITIES}")


def evenly(items: Sequence, k: int) -> list:
    """At most ``k`` of ``items``, evenly spread, first and last always kept."""
    n = len(items)
    if k <= 0:
        raise ValueError(f"max_layers={k} must be at least 1")
    if n <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per method, stable across the figures of one report."""
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}
