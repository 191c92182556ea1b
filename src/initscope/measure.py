"""Measuring what an initialization does, by brute force: the ground truth for every prediction.

For each weight layer: the mean ``E[u²]`` of its output over batch, channels and positions, and the
mean ``E[(∂L/∂x)²]`` of the gradient at its input, with ``L = Σ output · ξ`` for fixed i.i.d.
N(0, 1) noise ξ, so the gradient at the output is i.i.d. N(0, 1) as in the plan's predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from initscope.plan import InitPlan


@dataclass(frozen=True)
class Measured:
    """Per-layer measurements of one draw (keys: module names)."""

    out_var: dict[str, float]
    in_grad_var: dict[str, float]


def _weight_modules(model: nn.Module, names: list[str] | None) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    if names is None:
        names = [n for n, m in mods.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    return {n: mods[n] for n in names}


def measure_once(model: nn.Module, inputs: torch.Tensor, names: list[str] | None = None,
                 generator: torch.Generator | None = None) -> Measured:
    """One forward and backward pass with hooks; the model's parameters' ``.grad`` are left as they were."""
    modules = _weight_modules(model, names)
    out_var: dict[str, float] = {}
    in_grad: dict[str, float] = {}
    handles = []

    def fwd_hook(name):
        def hook(module, args, output):
            if name not in out_var:
                out_var[name] = float(output.detach().double().pow(2).mean())
        return hook

    def pre_hook(name):
        def hook(module, args):
            x = args[0]
            if name not in in_grad and x.requires_grad:
                def grad_hook(g, name=name):
                    in_grad.setdefault(name, float(g.detach().double().pow(2).mean()))
                x.register_hook(grad_hook)
        return hook

    for name, m in modules.items():
        handles.append(m.register_forward_hook(fwd_hook(name)))
        handles.append(m.register_forward_pre_hook(pre_hook(name)))
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        x = inputs.detach().clone().requires_grad_(True)
        out = model(x)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        (out * noise).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.grad = saved[n]
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
        runs.append(measure_once(model, x, names, gen))
    return Measured(
        {n: geometric_mean([r.out_var[n] for r in runs]) for n in names},
        {n: geometric_mean([r.in_grad_var.get(n, 0.0) for r in runs]) for n in names},
    )
