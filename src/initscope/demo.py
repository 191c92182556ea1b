"""The demo: every method on the poster's plain 34-layer net and a BatchNorm-free ResNet-18, at init;
then a short training sweep on digits.

:func:`run_demo` plans each method, draws it, measures the per-layer forward and gradient second
moments with i.i.d. N(0, 1) inputs and output gradients, and saves predicted-vs-measured figures and
the numbers. :func:`run_demo_sweep` trains :func:`demo_sweep` (``examples/demo_digits.toml``) and
writes its report. Needs no data and no network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from initscope.api import plan as make_plan
from initscope.measure import measure
from initscope.methods import METHODS
from initscope.models import create_model
from initscope.plotting import plot_variance_vs_depth

if TYPE_CHECKING:
    from initscope.experiments.config import SweepConfig
    from initscope.experiments.engines import SweepSummary
    from initscope.experiments.tables import Report

DEMO_MODELS = ("plain34", "resnet18-nobn")
# The comparison pages show the papers' five methods; the sweep adds the two exact ASV variants.
DEMO_REPORT_METHODS = ("xavier", "kaiming-forward", "kaiming-backward", "asv-forward", "asv-backward")
DEMO_METHODS = (*DEMO_REPORT_METHODS, "asv-forward-exact", "asv-backward-exact")


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
    """Plan, draw and measure every method on each model; save ``variance_<model>.png`` and ``.json``.

    ``progress`` is called with ``"<model>: <method>"`` before each plan.
    """
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
            if getattr(METHODS[method], "needs_data", False):  # planned on a batch like those it is measured on
                gaussian = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
                p = make_plan(model, method, example_input=gaussian)
            else:
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


# -- the demo's sweep ------------------------------------------------------------------------------------


def demo_sweep(out_dir: str | Path, *, epochs: int = 8) -> "SweepConfig":
    """The demo's sweep: scikit-learn's digits (no download), the poster's plain 34-layer net at width 8,
    the five methods of the papers and the two exact ASV variants, Adam at 1e-3, one seed.
    ``examples/demo_digits.toml`` is the same sweep as a file."""
    from initscope.experiments.config import SweepConfig

    out_dir = Path(out_dir)
    return SweepConfig(grid={"data": ["digits"], "model": ["plain34"], "method": list(DEMO_METHODS),
                             "optimizer": ["adam"], "lr": [1e-3], "seed": [0]},
                       fixed={"width": 8, "epochs": epochs, "batch_size": 64},
                       db=out_dir / "sweep.db", out=out_dir / "runs", name="demo-digits")


def run_demo_sweep(out_dir: str | Path, *, epochs: int = 8, progress: bool = True,
                   threads: int | None = 1) -> tuple["SweepSummary", "Report"]:
    """Run :func:`demo_sweep` (resuming what an earlier call left) and write its report to
    ``out_dir/report`` (``report.html``, ``report.md``, CSVs, curves). Returns (summary, report).

    One torch thread by default: the width-8 net's convolutions gain little from a second thread, and
    on a shared machine an oversubscribed default can be many times slower.
    """
    from initscope.experiments.engines import run_sweep
    from initscope.experiments.tables import write_report

    sweep = demo_sweep(out_dir, epochs=epochs)
    summary = run_sweep(sweep, progress=progress, threads=threads)
    report = write_report(sweep.db, Path(out_dir) / "report",
                          title="initscope demo: initializations of a plain 34-layer net on digits")
    return summary, report
