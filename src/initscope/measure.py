"""Measuring what an initialization does, by brute force: the ground truth for every prediction.

For each weight layer: the mean ``E[u²]`` of its output over batch, channels and positions, and the
mean ``E[(∂L/∂x)²]`` of the gradient at its input, with ``L = Σ output · ξ`` for fixed i.i.d.
N(0, 1) noise ξ, so the gradient at the output is i.i.d. N(0, 1) as in the plan's predictions. The
measuring is the probe's (:func:`initscope.probe`, second moments only); this module draws the plan
several times and takes the geometric mean, which is what a prediction for a typical draw is held to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from initscope.plan import InitPlan
from initscope.probe import probe


@dataclass(frozen=True)
class Measured:
    """Per-layer measurements of one draw (keys: module names)."""

    out_var: dict[str, float]
    in_grad_var: dict[str, float]


def measure_once(model: nn.Module, inputs: torch.Tensor, names: list[str] | None = None, *, seed: int = 0) -> Measured:
    """One forward and backward pass through the probe; the model's parameters' ``.grad`` are untouched.

    ``names``: the layers to measure (default: every weight layer); ``seed``: the loss noise ξ.
    """
    p = probe(model, inputs, plan=None, layers=names if names is not None else "weighted", seed=seed,
              quantities=("output", "input_grad"), quantiles=False, histograms=False)
    out_var = {layer.name: layer.meas_out_var for layer in p.layers}
    in_grad = {layer.name: layer.meas_in_grad_var for layer in p.layers if math.isfinite(layer.meas_in_grad_var)}
    return Measured(out_var, in_grad)


def geometric_mean(values: list[float]) -> float:
    vals = [v for v in values if v > 0]
    if len(vals) < len(values) or not vals:
        return 0.0
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def measure(model: nn.Module, plan: InitPlan, input_shape: tuple[int, ...], *, batch: int = 32, draws: int = 3,
            seed: int = 0, inputs: Callable[[torch.Generator], torch.Tensor] | None = None) -> Measured:
    """Draw the plan ``draws`` times and return the geometric mean of each layer's measurements.

    Inputs are i.i.d. N(0, 1) of shape ``(batch, *input_shape)`` unless ``inputs`` makes them.
    """
    names = [layer.name for layer in plan.layers]
    runs = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(seed + 1000 * d)
        plan.apply(model, generator=gen)
        x = inputs(gen) if inputs is not None else torch.randn(batch, *input_shape, generator=gen)
        runs.append(measure_once(model, x, names, seed=seed + 1000 * d))
    return Measured(
        {n: geometric_mean([r.out_var[n] for r in runs]) for n in names},
        {n: geometric_mean([r.in_grad_var.get(n, 0.0) for r in runs]) for n in names},
    )
