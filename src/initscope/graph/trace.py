"""Tracing a model into the graph the propagation walks.

Modules that have a rule are leaves (one node each); everything else is traced through, so a custom
block built from known layers needs no rule. The model is traced in eval mode (so that Python
branches on ``self.training``, such as auxiliary heads, take one fixed path) and its modes are
restored afterwards. What the eval-mode trace loses is the mode itself: a functional dropout traces
with ``training=False`` baked in. Every node is therefore stamped with the mode of the module it runs
in (``node.meta["initscope_training"]``), and with that module's qualified name
(``node.meta["initscope_mode_of"]``): the dropout and normalization rules read the mode, and a plan
records the modes its predictions were made for by name, so that a probe of the model in other modes
can tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from initscope.errors import TraceError
from initscope.rules import registry


class _Tracer(fx.Tracer):
    def __init__(self, record_stack_traces: bool = False) -> None:
        super().__init__(param_shapes_constant=False)
        self.record_stack_traces = record_stack_traces
        self.stack: list[tuple[str, type]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if registry.has_module_rule(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append((path, type(m)))
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            raise
        self.stack.pop()
        return result


@dataclass
class Traced:
    """A traced model: its graph, and the parameters its ``get_attr`` nodes read."""

    model: nn.Module
    graph: fx.Graph
    nodes: list[fx.Node] = field(default_factory=list)

    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def trace(model: nn.Module, record_stack_traces: bool = False) -> Traced:
    """Trace ``model`` with torch.fx, treating modules that have a rule as single ops."""
    if isinstance(model, fx.GraphModule):
        return _finish(model, model.graph)
    modes = [(m, m.training) for m in model.modules()]
    tracer = _Tracer(record_stack_traces)
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises several types; all mean "could not trace"
        where, cls = tracer.stack[-1] if tracer.stack else ("", type(model))
        place = f"in module {where!r} ({cls.__name__})" if where else f"in {type(model).__name__}.forward"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__} {place}: {exc}\n"
            f"initscope follows the traced graph to model the signal. What to do: register a rule for "
            f"{cls.__name__} with @initscope.register_rule({cls.__name__}) so it is treated as one op, or "
            "remove the Python control flow on tensor values from its forward."
        ) from exc
    finally:
        _restore_modes(modes)
    return _finish(model, graph)


def _finish(model: nn.Module, graph: fx.Graph) -> Traced:
    nodes = list(graph.nodes)
    modes = {name: m.training for name, m in model.named_modules()}
    for node in nodes:
        if node.op == "get_attr":
            node.meta["initscope_param"] = _fetch(model, node.target)
        elif node.op in ("call_module", "call_function", "call_method"):
            owner = _mode_owner(modes, node)
            node.meta["initscope_mode_of"] = owner
            node.meta["initscope_training"] = modes.get(owner, model.training)
    return Traced(model, graph, nodes)


def _mode_owner(modes: dict[str, bool], node: fx.Node) -> str:
    """The qualified name of the module whose mode a node runs in: the module itself for
    ``call_module``, else the innermost module of its call stack ("" for the model itself)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path in modes:
            return path
    return ""


def _fetch(model: nn.Module, target: str) -> torch.Tensor:
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
