r"""LSUV, layer-sequential unit-variance initialization (Mishkin and Matas, ICLR 2016).

Each weight layer is drawn orthogonal, then, in the order of the forward pass, rescaled on a batch of
data until the variance of its output is 1:

.. math::
    W_l \leftarrow W_l / \sqrt{\mathrm{Var}(u_l)} \quad \text{until} \quad |\mathrm{Var}(u_l) - 1| < 0.1
    \ \text{(at most 10 times)}

It needs data, so it plans only with ``example_input``, and its stds are the draw's, measured: the
plan's ``std`` and predictions are those of the data-free starting point that aims at the same target
(every layer's predicted output second moment 1 on that batch's statistics, as ``asv-forward-exact``
does), and its notes say that the written stds are set on the batch when the plan is applied.

Our own implementation rather than the ``lsuv`` package: the rescaling has to run on the draws before
anything is written (a failure leaves the model as it was), through ``torch.func.functional_call``
with the model's buffers copied (a BatchNorm's running statistics are not touched), and it must work
on any model initscope plans, where the packages walk ``nn.Sequential`` chains or write as they go.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from initscope.methods.asv import AsvForwardExact
from initscope.methods.base import register_method

TOLERANCE = 0.1
MAX_ITERATIONS = 10


class _Captured(Exception):
    """Raised by the hook once the layer's output is seen: the rest of the forward pass is not needed."""


def _output_variance(model: nn.Module, module: nn.Module, tensors: dict[str, torch.Tensor], inputs: tuple) -> float:
    """The variance of ``module``'s (first) output when ``model`` runs on ``inputs`` with ``tensors``."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        seen.append(output.detach())
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        functional_call(model, tensors, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"lsuv: {type(module).__name__} was not reached by the forward pass on the batch")
    return float(seen[0].double().var())


@register_method("lsuv")
class LSUV(AsvForwardExact):
    summary = "Mishkin & Matas 2016: orthogonal, then each layer scaled on a batch to output variance 1"
    distribution = "orthogonal"
    fixed_distribution = True
    needs_data = True
    adjusts = True
    residual = "none"

    def full_pass(self, job):
        chosen = super().full_pass(job)
        chosen.notes.append(
            "lsuv: the stds written are set on the example batch when the plan is applied (each layer scaled "
            f"until its output variance is within {TOLERANCE} of 1); std and the predictions here are the "
            "data-free start that aims at the same target"
        )
        return chosen

    def adjust(self, model: nn.Module, plan: Any, candidates: dict[str, torch.Tensor]) -> None:
        """Rescale the drawn weights in ``candidates`` (path -> tensor) layer by layer on the plan's batch."""
        batch = plan.example
        if batch is None:
            raise ValueError("lsuv sets its stds on data: plan it with example_input=<a batch> before applying")
        inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
        # Copies of the buffers: a BatchNorm in training mode updates its running statistics.
        tensors = {name: b.detach().clone() for name, b in model.named_buffers()}
        tensors.update({name: p.detach() for name, p in params.items()})

        def put(path: str) -> None:
            tensors[path] = candidates[path].to(params[path].dtype)

        for path in candidates:
            put(path)
        with torch.no_grad():
            for layer in plan.layers:
                module = model.get_submodule(layer.name)
                for _ in range(MAX_ITERATIONS):
                    var = _output_variance(model, module, tensors, inputs)
                    if not (math.isfinite(var) and var > 0):
                        raise ValueError(f"lsuv: layer {layer.name!r} has output variance {var} on the batch; "
                                         "nothing was written")
                    if abs(var - 1.0) < TOLERANCE:
                        break
                    candidates[layer.weight_path].div_(math.sqrt(var))
                    put(layer.weight_path)
