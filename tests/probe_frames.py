"""Build tables in the probe's format (the contract between the probe and the figures) from real
random tensors, so the figures and the report can be tested apart from the probe itself."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    "layer", "index", "kind", "quantity", "count", "mean", "var", "second_moment", "min", "max",
    "q01", "q05", "q25", "q50", "q75", "q95", "q99", "zero_frac", "nonfinite", "hist_lo", "hist_hi", "hist_counts",
    "pred_out_var", "pred_in_grad_var", "meas_out_var", "meas_in_grad_var", "out_ratio", "in_grad_ratio", "flagged",
]
QS = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95, "q99": 0.99}


def stats_of(x: np.ndarray, bins: int) -> dict:
    x = np.asarray(x, dtype=np.float64).ravel()
    finite = x[np.isfinite(x)]
    lo, hi = float(finite.min()), float(finite.max())
    counts, _ = np.histogram(finite, bins=bins, range=(lo, hi))
    row = {
        "count": int(x.size), "mean": float(finite.mean()), "var": float(finite.var()),
        "second_moment": float(np.mean(finite ** 2)), "min": lo, "max": hi,
        "zero_frac": float(np.mean(x == 0)), "nonfinite": int(x.size - finite.size),
        "hist_lo": lo, "hist_hi": hi, "hist_counts": [int(c) for c in counts],
    }
    row.update({k: float(np.quantile(finite, q)) for k, q in QS.items()})
    return row


def layer_names(n_layers: int) -> list[str]:
    return [f"features.{2 * i}" for i in range(n_layers - 1)] + ["fc"]


def make_frame(methods=("xavier", "kaiming-forward"), n_layers: int = 5, bins: int = 16, seed: int = 0,
               flag_layer: int | None = 1, predictions: bool = True) -> pd.DataFrame:
    """A concatenated probe table with a ``method`` column (drop it for a single probe's table).

    Every layer has weight, output, output_grad, input_grad and weight_grad rows; all but the last
    (a linear head) have an activation row (a ReLU). Predictions equal the measurement times a
    method-dependent factor near 1, except at ``flag_layer`` where they are 3x off (flagged).
    """
    rng = np.random.default_rng(seed)
    frames = []
    for mi, method in enumerate(methods):
        scale = 1.0 + 0.5 * mi
        rows = []
        for li, name in enumerate(layer_names(n_layers)):
            last = li == n_layers - 1
            kind = "linear" if last else "conv2d"
            w = rng.normal(0, 0.1 * scale, size=200)
            out = rng.normal(0, scale * (1.1 ** li), size=400)
            tensors = {"weight": w, "output": out}
            if not last:
                tensors["activation"] = np.maximum(out, 0.0)
            tensors["output_grad"] = rng.normal(0, 1.0, size=400)
            tensors["input_grad"] = rng.normal(0, 0.8 * scale, size=400)
            tensors["weight_grad"] = rng.normal(0, 0.05, size=200)
            st = {q: stats_of(t, bins) for q, t in tensors.items()}
            meas_out, meas_in = st["output"]["second_moment"], st["input_grad"]["second_moment"]
            off = 3.0 if li == flag_layer else 1.0 + 0.1 * mi
            pred_out = meas_out / off if predictions else np.nan
            pred_in = meas_in / (1.0 + 0.05 * li) if predictions else np.nan
            layer_cols = {
                "pred_out_var": pred_out, "pred_in_grad_var": pred_in,
                "meas_out_var": meas_out, "meas_in_grad_var": meas_in,
                "out_ratio": meas_out / pred_out, "in_grad_ratio": meas_in / pred_in,
            }
            ratios = [layer_cols["out_ratio"], layer_cols["in_grad_ratio"]]
            layer_cols["flagged"] = bool(any(np.isfinite(r) and not 0.5 <= r <= 2.0 for r in ratios))
            for q, s in st.items():
                rows.append({"layer": name, "index": li, "kind": kind, "quantity": q, **s, **layer_cols})
        frame = pd.DataFrame(rows, columns=COLUMNS)
        frame.insert(0, "method", method)
        frame["weight_layer"] = True  # every layer here is a conv or a linear, as compare marks them
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def tiny_cnn():
    """A small ReLU CNN for end-to-end report tests (3 channels in, 10 classes out; any H, W >= 4)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )


SHARED_METHODS = ("xavier", "kaiming-forward", "asv-backward")


@functools.lru_cache(maxsize=1)
def shared_report():
    """One comparison report on :func:`tiny_cnn`, made once per test session and shared by the report
    and browser tests (it is the slowest part of both); removed when the session ends."""
    from initscope.compare import compare

    out = Path(tempfile.mkdtemp(prefix="initscope-report-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return compare(tiny_cnn, ",".join(SHARED_METHODS), input_shape=(3, 16, 16), batch=8, seed=3, out_dir=out)
