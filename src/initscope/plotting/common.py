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
# Smallest text on any figure, in points: legible on the page and in a paper's column at 100 %.
MIN_FONT = 7

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


# -- a symmetric log axis whose threshold comes from the data ---------------------------------------------

LINSCALE = 1.0  # the linear region |y| <= linthresh takes the height of one decade, as matplotlib's default
# A box narrower than this fraction of its panel's span (lowest to highest whisker) is a flat line of a few
# pixels on a linear axis (Xavier's 1e-7 activations beside Kaiming's 1; a deep plain net's 0.02 weights
# beside its first layer's 0.7): "auto" then takes a symmetric log axis. One normal layer alone spans
# 1.35 sigma of box in 4.7 sigma of whiskers; layers a decade apart in std, 1:35.
MIN_BOX_FRACTION = 0.02
# A box narrower than this fraction of the panel's largest value does not set the threshold (a layer all but
# dead would stretch the axis over twenty decades).
MIN_RELATIVE_THRESHOLD = 1e-12


def symlog_threshold(spreads: Sequence[float], largest: float) -> float | None:
    """The linear threshold of a symlog axis: a power of ten at most half the narrowest positive box, so that
    every box (q25 to q75) is at least two linear units tall; None when no box has a positive spread."""
    import math

    floor = abs(largest) * MIN_RELATIVE_THRESHOLD
    positive = [float(d) for d in spreads if d == d and d > 0 and d >= floor]
    if not positive:
        return None
    return 10.0 ** math.floor(math.log10(min(positive) / 2))


def wants_symlog(spreads: Sequence[float], low: float, high: float) -> bool:
    """``"auto"``'s choice: symlog when the panel's narrowest box (q25 to q75) is under
    :data:`MIN_BOX_FRACTION` of its span from ``low`` to ``high`` (its whiskers, and zero)."""
    span = float(high) - float(low)
    positive = [float(d) for d in spreads if d == d and d > 0]
    return bool(positive) and span > 0 and min(positive) < MIN_BOX_FRACTION * span


def decade_label(k: int, sign: int = 1) -> str:
    """``10**k`` as a short tick label: 0.01, 0.1, 1, 10, 100, then 1e-3, 1e3 and beyond."""
    text = f"{10.0 ** k:g}" if -2 <= k <= 2 else f"1e{k}"
    return ("\u2212" + text) if sign < 0 else text


def symlog_ticks(linthresh: float, low: float, high: float, max_labels: int = 6) -> tuple[list[float], list[str]]:
    """Major ticks of a symlog axis from ``low`` to ``high``: 0 and powers of ten from the threshold outwards,
    every ``s``-th decade so that each side has at most ``max_labels`` labels (labels never crowd near zero:
    neighbouring labels are at least one decade's height apart). Returns (values, labels)."""
    import math

    k_lo = round(math.log10(linthresh))
    k_hi = max(k_lo, math.ceil(math.log10(max(abs(low), abs(high), linthresh))))
    step = max(1, math.ceil((k_hi - k_lo + 1) / max_labels))
    ks = [k for k in range(k_hi, k_lo - 1, -step)][::-1]
    values, labels = [0.0], ["0"]
    for sign, bound in ((1, high), (-1, low)):
        for k in ks:
            if sign * bound >= 10.0 ** k * 0.999:
                values.append(sign * 10.0 ** k)
                labels.append(decade_label(k, sign))
    order = sorted(range(len(values)), key=values.__getitem__)
    return [values[i] for i in order], [labels[i] for i in order]


def symlog_transform(y: "float | Sequence[float]", linthresh: float) -> "np.ndarray":
    """matplotlib's symlog transform (base 10, :data:`LINSCALE`), in units of decades: linear within
    ``±linthresh``, ``sign(y) (L + log10(|y| / linthresh))`` beyond, with ``L = linscale / (1 - 1/10)``. The
    interactive pages draw boxes on this scale with the ticks of :func:`symlog_ticks`, so that they look as
    the PNG does."""
    import numpy as np

    y = np.asarray(y, dtype=float)
    lin = LINSCALE / (1 - 0.1)
    a = np.abs(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(a <= linthresh, y / linthresh * lin, np.sign(y) * (lin + np.log10(a / linthresh)))
    return out


def short_name(name: str, limit: int = 24) -> str:
    """A layer name cut in the middle to at most ``limit`` characters (``features.16.…conv.1.0``): the start
    says where in the net, the end which module."""
    name = str(name)
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: (keep + 1) // 2] + "\u2026" + name[len(name) - keep // 2:]
