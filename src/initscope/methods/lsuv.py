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
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from initscope.methods.asv import AsvForwardExact
from initscope.methods.base import register_method

TOLERANCE = 0.1
MAX_ITERATIONS = 10


class _Captured(Exception):
    """Raised by the hook once the layer's output is seen: the rest of the forward pass is not needed."""


def _output_variance(model: nn.Module, module: nn.Module, tensors: dict[str, torch.Tensor], inputs: tuple) -> float | None:
    """The variance of ``module``'s output when ``model`` runs on ``inputs`` with ``tensors``; None when its
    forward is not called (its weight is used by another module's code) or returns no tensor."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            seen.append(output.detach())
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        functional_call(model, tensors, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return float(seen[0].double().var()) if seen else None


def _uses(node: fx.Node, weight_path: str) -> bool:
    """Whether the traced ``node`` is a call of the weight at ``weight_path`` (a module's or a functional one)."""
    if node.op == "call_module":
        return f"{node.target}.weight" == weight_path
    if node.op != "call_function":
        return False
    args = list(node.args) + list(node.kwargs.values())
    return any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == weight_path for a in args)


class _Graph:
    """The model as initscope traces it, run up to the first call of a weight.

    A weight used outside its module's forward (``nn.MultiheadAttention``'s ``in_proj_weight`` and
    ``out_proj``, Swin's ``qkv`` and ``proj``, which torchvision calls through ``F.linear``) has no
    module output to hook; the traced graph writes such modules out as one call per weight
    (:mod:`initscope.graph.trace`), and that call's output is the layer's.
    """

    def __init__(self, model: nn.Module) -> None:
        from initscope.graph.trace import trace

        self.module = fx.GraphModule(model, trace(model).graph)

    def variance(self, weight_path: str, tensors: dict[str, torch.Tensor], inputs: tuple) -> float | None:
        target = next((n for n in self.module.graph.nodes if _uses(n, weight_path)), None)
        if target is None:
            return None
        seen: list[torch.Tensor] = []

        class Stop(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is target:
                    if isinstance(out, torch.Tensor):
                        seen.append(out.detach())
                    raise _Captured
                return out

        class Run(nn.Module):
            def __init__(self, graph: fx.GraphModule) -> None:
                super().__init__()
                self.graph = graph

            def forward(self, *args):
                return Stop(self.graph).run(*args)

        own = {name for name, _ in self.module.named_parameters()} | {name for name, _ in self.module.named_buffers()}
        try:
            functional_call(Run(self.module), {f"graph.{k}": v for k, v in tensors.items() if k in own}, inputs)
        except _Captured:
            pass
        return float(seen[0].double().var()) if seen else None


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
        graph: _Graph | None = None
        with torch.no_grad():
            for layer in plan.layers:
                module = model.get_submodule(layer.name)
                hooked = layer.weight_path == f"{layer.name}.weight"
                for _ in range(MAX_ITERATIONS):
                    var = _output_variance(model, module, tensors, inputs) if hooked else None
                    if var is None:
                        hooked = False
                        graph = graph or _Graph(model)
                        var = graph.variance(layer.weight_path, tensors, inputs)
                    if var is None:
                        raise ValueError(f"lsuv: {layer.name!r} was not reached by the forward pass on the batch")
                    if not (math.isfinite(var) and var > 0):
                        raise ValueError(f"lsuv: layer {layer.name!r} has output variance {var} on the batch; "
                                         "nothing was written")
                    if abs(var - 1.0) < TOLERANCE:
                        break
                    candidates[layer.weight_path].div_(math.sqrt(var))
                    put(layer.weight_path)
