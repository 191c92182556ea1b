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
from typing import Any, Callable

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


# Reruns one weight layer on the input it saw, with the tensors (path -> tensor) given: the layers before
# it are settled while it is scaled, so only the layer itself is run again.
Replay = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _own(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _module_call(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], inputs: tuple) -> Replay | None:
    """Run ``model`` on ``inputs`` with ``tensors`` up to the module ``name``; None when its forward is not
    called (its weight is used by another module's code) or returns no tensor."""
    module = model.get_submodule(name)
    seen: list[tuple] = []

    def hook(mod, args, kwargs, output):
        if isinstance(output, torch.Tensor):
            seen.append((args, kwargs))
        raise _Captured

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        functional_call(model, tensors, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        return None
    args, kwargs = seen[0]
    return lambda t: functional_call(module, _own(t, name), args, kwargs)


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
        self.names = {n for n, _ in self.module.named_parameters()} | {n for n, _ in self.module.named_buffers()}

    def call(self, weight_path: str, tensors: dict[str, torch.Tensor], inputs: tuple) -> Replay | None:
        target = next((n for n in self.module.graph.nodes if _uses(n, weight_path)), None)
        if target is None:
            return None
        seen: list[tuple] = []

        class Stop(fx.Interpreter):
            def run_node(self, n):
                if n is target:
                    seen.append(self.fetch_args_kwargs_from_env(n))
                    raise _Captured
                return super().run_node(n)

        class Run(nn.Module):
            def __init__(self, graph: fx.GraphModule) -> None:
                super().__init__()
                self.graph = graph

            def forward(self, *args):
                return Stop(self.graph).run(*args)

        try:
            functional_call(Run(self.module), {f"graph.{k}": v for k, v in tensors.items() if k in self.names}, inputs)
        except _Captured:
            pass
        if not seen:
            return None
        args, kwargs = seen[0]
        if target.op == "call_module":
            module = self.module.get_submodule(str(target.target))
            return lambda t: functional_call(module, _own(t, str(target.target)), args, kwargs)

        def fresh(node_arg, value, t):
            # The parameters the call reads are the tensors being scaled, not the ones it saw.
            return t[node_arg.target] if isinstance(node_arg, fx.Node) and node_arg.op == "get_attr" else value

        return lambda t: target.target(*(fresh(a, v, t) for a, v in zip(target.args, args)),
                                       **{k: fresh(target.kwargs[k], v, t) for k, v in kwargs.items()})


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
                hooked = layer.weight_path == f"{layer.name}.weight"
                replay = _module_call(model, layer.name, tensors, inputs) if hooked else None
                if replay is None:
                    graph = graph or _Graph(model)
                    replay = graph.call(layer.weight_path, tensors, inputs)
                if replay is None:
                    raise ValueError(f"lsuv: {layer.name!r} was not reached by the forward pass on the batch")
                for _ in range(MAX_ITERATIONS):
                    var = float(replay(tensors).double().var())
                    if not (math.isfinite(var) and var > 0):
                        raise ValueError(f"lsuv: layer {layer.name!r} has output variance {var} on the batch; "
                                         "nothing was written")
                    if abs(var - 1.0) < TOLERANCE:
                        break
                    candidates[layer.weight_path].div_(math.sqrt(var))
                    put(layer.weight_path)
