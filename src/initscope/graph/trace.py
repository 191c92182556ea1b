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

import functools
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
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
        if type(m) in _DECOMPOSED:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append((path, type(m)))
        decomposed = _DECOMPOSED.get(type(m)) if not registry.has_module_rule(m) else None
        if decomposed is not None:
            # Traced as the ops it is made of, one weight per op (see _DECOMPOSED).
            forward = functools.partial(decomposed, m)
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            raise
        self.stack.pop()
        return result


def multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention`` as the ops it computes, so that its projections are weight layers.

    Its ``in_proj_weight`` (3E × E) is one parameter that projects q, k and v; as one module the layer
    would hold two weights, and a weight layer is one. Written out: ``F.linear`` by ``in_proj_weight``
    (once for self-attention, and chunked; once per input otherwise, each keeping its third: the
    weight is then used by three calls and gets one std), ``F.scaled_dot_product_attention`` over the
    heads, and ``out_proj``. Statistically the same op (the module's attention dropout is taken in
    eval mode, and ``key_padding_mask`` is not modelled); only the propagation reads this graph. The
    attention weights are not returned (None).
    """
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads = m.num_heads
    if m._qkv_same_embed_dim:
        w, b = m.in_proj_weight, m.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            q = F.linear(query, w, b).chunk(3, dim=-1)[0]
            k = F.linear(key, w, b).chunk(3, dim=-1)[1]
            v = F.linear(value, w, b).chunk(3, dim=-1)[2]
    else:
        bq = bk = bv = None
        if m.in_proj_bias is not None:
            bq, bk, bv = m.in_proj_bias.chunk(3)
        q = F.linear(query, m.q_proj_weight, bq)
        k = F.linear(key, m.k_proj_weight, bk)
        v = F.linear(value, m.v_proj_weight, bv)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    out = m.out_proj(o.transpose(1, 2).flatten(2))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, None


# Modules traced as a composition of ops with one weight each, instead of through their own forward.
_DECOMPOSED = {nn.MultiheadAttention: multihead_attention}


def _register_optional_rules() -> None:
    """Rules and decompositions for timm's and torchvision's blocks, once that library is imported: only
    then can a model hold them, and initscope never imports either itself (each costs seconds)."""
    if "timm" in sys.modules:
        import initscope.rules.timm_layers  # noqa: F401  (weight-standardized convs)
    if "torchvision" in sys.modules:
        import initscope.rules.torchvision_layers  # noqa: F401
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        from initscope.rules.windows import swin_attention

        _DECOMPOSED.setdefault(ShiftedWindowAttention, swin_attention)


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
    _register_optional_rules()
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
            features = _linear_in_features(model, node)
            if features is not None:
                node.meta["initscope_linear_in"] = features
            elif node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), nn.Identity):
                node.meta["initscope_identity"] = True  # timm's q_norm / k_norm when qk_norm is off
    return Traced(model, graph, nodes)


def _linear_in_features(model: nn.Module, node: fx.Node) -> int | None:
    """The width a Linear reads (``nn.Linear`` or ``F.linear`` by a parameter), None for any other node.

    The attention rule reads it: q, k and v projected by one Linear from the same tokens are images of
    the same E-dimensional vectors (:mod:`initscope.rules.attention`)."""
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        return int(m.in_features) if isinstance(m, nn.Linear) else None
    if node.op == "call_function" and node.target is F.linear:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return int(_fetch(model, w.target).shape[-1])
    return None


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
