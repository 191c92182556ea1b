"""The demo: every method on the poster's plain 34-layer net and a BatchNorm-free ResNet-18, at init.

Plans each method, draws it, measures the per-layer forward and gradient second moments with
i.i.d. N(0, 1) inputs and output gradients, and saves predicted-vs-measured figures and the numbers.
Needs no data and no network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from initscope.api import plan as make_plan
from initscope.measure import measure
from initscope.methods import METHODS
from initscope.models import create_model
from initscope.plotting import plot_variance_vs_depth

DEMO_MODELS = ("plain34", "resnet18-nobn")


@dataclass
class DemoResult:
    model: str
    figure: Path
    table: dict  # method -> {"pred_out": [...], "meas_out": [...], "pred_grad": [...], "meas_grad": [...]}

    def worst(self, method: str) -> tuple[float, float]:
        """Largest |log2(measured / predicted)| over the layers, forward and backward."""
        r = self.table[method]

        def gap(pred, meas):
            vals = [abs(math.log2(m / p)) for p, m in zip(pred, meas) if p > 0 and m > 0]
            return max(vals) if vals else math.nan

        return gap(r["pred_out"], r["meas_out"]), gap(r["pred_grad"], r["meas_grad"])


def run_demo(
    out_dir: str | Path = "demo-output",
    models: tuple[str, ...] = DEMO_MODELS,
    methods: tuple[str, ...] | None = None,
    input_shape: tuple[int, ...] = (3, 64, 64),
    batch: int = 32,
    draws: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[DemoResult]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = tuple(methods or METHODS)
    results = []
    torch.manual_seed(seed)
    for name in models:
        model: nn.Module = create_model(name)
        table = {}
        for method in methods:
            if progress:
                progress(f"{name}: {method}")
            p = make_plan(model, method, input_shape=input_shape)
            meas = measure(model, p, input_shape, batch=batch, draws=draws, seed=seed)
            table[method] = {
                "layers": [layer.name for layer in p.layers],
                "pred_out": [layer.pred_out_var for layer in p.layers],
                "meas_out": [meas.out_var[layer.name] for layer in p.layers],
                "pred_grad": [layer.pred_in_grad_var for layer in p.layers],
                "meas_grad": [meas.in_grad_var[layer.name] for layer in p.layers],
            }
        shape = "x".join(map(str, input_shape))
        fig = plot_variance_vs_depth(
            table, out / f"variance_{name}.png",
            title=f"{name}, input {shape}, batch {batch}, geometric mean of {draws} draws: predicted (dashed) vs measured (solid)",
        )
        (out / f"variance_{name}.json").write_text(json.dumps(table, indent=1))
        results.append(DemoResult(name, fig, table))
    return results
