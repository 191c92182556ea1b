"""The propagation: second moments forward and backward through a traced graph.

Like ``torch.fx.passes.shape_prop.ShapeProp``, the forward pass interprets the graph node by node,
but each tensor is replaced by a :class:`~initscope.stats.signal.Signal` and each op by its rule. The
backward pass walks the nodes in reverse and sends :class:`~initscope.stats.signal.Grad` values from
every node to its inputs, summing what reaches a tensor from several consumers.

Weight layers are where initialization acts. Their rules give the statistics for unit weight
variance; a :class:`WeightHook` decides each layer's variance (it may choose it from what arrives, as
the exact ASV variants do) and the pass scales by it. The same engine runs the paper's model
(``local``: every weight layer's output reset to i.i.d. N(0, 1), which leaves between layers exactly
the ASV factors τ and γ) and the full prediction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from initscope.errors import UnknownOpError, node_location
from initscope.graph.trace import Traced
from initscope.rules import registry
from initscope.rules.base import Context, Rule, WeightRule
from initscope.stats.fluctuation import combine, offset_scatter
from initscope.stats.signal import Grad, Scatter, Shared, Signal, Spatial

ON_UNKNOWN = ("error", "kaiming", "skip")


class WeightHook:
    """Decides the weight variance and the bias's second moment of each weight layer."""

    def forward(self, node: fx.Node, ctx: Context, unit: Signal) -> tuple[float, float]:
        raise NotImplementedError

    def backward(self, node: fx.Node, ctx: Context, unit: Grad, arrived: Grad | None) -> float:
        """The layer's variance, given its unit-variance input gradient and what already reached its input."""
        raise NotImplementedError


class FixedStds(WeightHook):
    """Every layer's std given ahead: the formula methods, and the final pass of the exact ones."""

    def __init__(self, stds: dict[fx.Node, float], bias_m2: dict[fx.Node, float]) -> None:
        self.stds, self.bias_m2 = stds, bias_m2

    def forward(self, node, ctx, unit):
        return self.stds[node] ** 2, self.bias_m2.get(node, 0.0)

    def backward(self, node, ctx, unit, arrived):
        return self.stds[node] ** 2


class Replay(WeightHook):
    """The weight variances and bias second moments another pass over the same graph used, node by
    node: that pass's predictions again under other conditions (the modules' own modes)."""

    def __init__(self, done: "Pass") -> None:
        self.forward_used, self.backward_used = done.forward_used, done.backward_used

    def forward(self, node, ctx, unit):
        return self.forward_used[node]

    def backward(self, node, ctx, unit, arrived):
        return self.backward_used.get(node, self.forward_used[node][0])


class ResidualHook:
    """May rescale the branches of a residual add before they are summed, and their gradients after."""

    def forward(self, node: fx.Node, args: tuple, values: dict) -> tuple:
        return args

    def backward(self, node: fx.Node, contributions: dict) -> dict:
        return contributions


def _signals_in(value: Any) -> bool:
    if isinstance(value, Signal):
        return True
    if isinstance(value, (list, tuple)):
        return any(_signals_in(v) for v in value)
    if isinstance(value, dict):
        return any(_signals_in(v) for v in value.values())
    return False


def finish_weight_forward(unit: Signal, var: float, bias_m2: float) -> Signal:
    """The output statistics of a weight layer from its unit-variance ones."""
    m = unit.mean_m2 * var
    total = m + bias_m2
    share = (lambda c: (c * m + bias_m2) / total) if total > 0 else (lambda c: c)
    cov = None if unit.spatial.cov is None else unit.spatial.cov * var + bias_m2
    pooled = unit.shared.pooled
    return Signal(unit.shape, unit.m2 * var + bias_m2, unit.layout, Spatial(cov, share(unit.spatial.rho)),
                  Shared(share(unit.shared.xcorr), None if pooled is None else share(pooled)), scatter=unit.scatter)


def _fresh(unit: Signal, inputs: list[Signal], channels: int) -> Signal:
    """A weight layer's output: new channel offsets on top of the scatter its input carries."""
    base = combine([s.scatter.logvar for s in inputs], [s.mean_m2 for s in inputs]) if inputs else 0.0
    return unit.with_(scatter=Scatter(base + offset_scatter(unit.shared.xcorr) / max(channels, 1), channels, base))


def _with_logvar(g: Grad, logvar: float) -> Grad:
    """``g`` with the scatter ``logvar``: ``g`` itself when it already carries it (a gradient through
    a normalization-headed net carries none, and a copy per edge is most of what the step costs)."""
    return g if g.scatter.logvar == logvar else g.with_(scatter=Scatter(logvar))


def _map_signals(value: Any, fn: Callable[[Signal], Signal]) -> Any:
    if isinstance(value, Signal):
        return fn(value) if value.const is None else value
    if isinstance(value, tuple):
        return tuple(_map_signals(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_signals(v, fn) for v in value]
    return value


@dataclass
class Resolved:
    """The rule of every call node, looked up once per traced graph."""

    traced: Traced
    rules: dict[fx.Node, Rule | None] = field(default_factory=dict)
    modules: dict[fx.Node, Any] = field(default_factory=dict)
    # What rules derive from a node alone (Context.remember), kept for every pass over this graph.
    memos: dict[fx.Node, dict] = field(default_factory=dict)

    @staticmethod
    def of(traced: Traced) -> "Resolved":
        r = Resolved(traced)
        for node in traced.nodes:
            if node.op == "call_module":
                m = traced.module(node)
                r.modules[node] = m
                r.rules[node] = registry.module_rule(m)
            elif node.op == "call_function":
                r.rules[node] = registry.function_rule(node.target)
            elif node.op == "call_method":
                r.rules[node] = registry.method_rule(node.target)
        return r

    def is_weight(self, node: fx.Node) -> bool:
        return isinstance(self.rules.get(node), WeightRule)


class Pass:
    """One forward (and optionally backward) propagation over a resolved graph."""

    def __init__(
        self,
        resolved: Resolved,
        inputs: list[Signal],
        weights: WeightHook,
        *,
        local: bool = False,
        plane: bool = False,
        max_cov: int = 64,
        on_unknown: str = "error",
        residual: ResidualHook | None = None,
        knobs: frozenset[fx.Node] = frozenset(),
        for_training: bool = False,
    ) -> None:
        self.r = resolved
        # Every op as in training mode (the passes that choose stds), or each in its module's mode.
        self.for_training = for_training
        self.knobs = knobs
        self.inputs = inputs
        self.weights = weights
        self.local, self.plane, self.max_cov = local, plane, max_cov
        self.on_unknown = on_unknown
        self.residual = residual
        self.values: dict[fx.Node, Any] = {}
        self.contexts: dict[fx.Node, Context] = {}
        self.grads: dict[fx.Node, Any] = {}
        self.owner: dict[int, tuple[fx.Node, int | None]] = {}
        self.outputs: Any = None
        # What the weight hook gave each weight layer, forward (variance, bias) and backward.
        self.forward_used: dict[fx.Node, tuple[float, float]] = {}
        self.backward_used: dict[fx.Node, float] = {}

    # -- forward -----------------------------------------------------------------------------------
    def forward(self) -> "Pass":
        values = self.values
        placeholders = iter(self.inputs)
        lookup: Callable[[fx.Node], Any] = values.__getitem__
        for node in self.r.traced.nodes:
            op = node.op
            if op == "placeholder":
                value = next(placeholders, None)
                if value is None:
                    value = node.args[0] if node.args else None
            elif op == "get_attr":
                fetched = node.meta["initscope_param"]
                value = Signal.constant(fetched) if isinstance(fetched, torch.Tensor) else fetched
            elif op == "output":
                self.outputs = map_arg(node.args[0], lookup)
                continue
            else:
                args = map_arg(node.args, lookup)
                kwargs = map_arg(node.kwargs, lookup)
                if not (_signals_in(args) or _signals_in(kwargs)):
                    value = self._plain(node, args, kwargs)
                else:
                    value = self._call(node, args, kwargs)
            values[node] = value
            self._own(node, value)
        return self

    def _own(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, Signal):
            self.owner[id(value)] = (node, None)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, Signal):
                    self.owner[id(v)] = (node, i)

    def _plain(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Python-level ops between values that are not tensors (shape arithmetic)."""
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.r.modules[node](*args, **kwargs)

    def _context(self, node: fx.Node, args: tuple, kwargs: dict) -> Context:
        ctx = Context(node, self.r.modules.get(node), args, kwargs, self.local, self.plane, self.max_cov,
                      knob=node in self.knobs, for_training=self.for_training, memo=self.r.memos.setdefault(node, {}))
        self.contexts[node] = ctx
        return ctx

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        rule = self.r.rules.get(node)
        if rule is None:
            rule = self._unknown(node)
        if self.residual is not None:
            args = self.residual.forward(node, args, self.values)
        ctx = self._context(node, args, kwargs)
        inputs = [s for s in _flatten((args, kwargs)) if isinstance(s, Signal) and s.const is None]
        if isinstance(rule, WeightRule):
            unit = _fresh(rule.forward_unit(ctx, *args, **kwargs), inputs, rule.channels(ctx))
            var, bias_m2 = self.weights.forward(node, ctx, unit)
            self.forward_used[node] = (var, bias_m2)
            out = unit if self.local else finish_weight_forward(unit, rule.effective_var(ctx, var), bias_m2)
        else:
            out = rule.forward(ctx, *args, **kwargs)
            out = _map_signals(out, lambda o: rule.fluctuation(ctx, inputs, o))
        ctx.out = out
        return out

    def _unknown(self, node: fx.Node) -> Rule:
        if self.on_unknown == "error":
            raise unknown_op_error(node, self.r)
        from initscope.rules.fallback import FallbackRule

        warnings.warn(
            f"no rule for {describe_node(node, self.r)}; modelled as "
            + ("the identity" if self.on_unknown == "skip" else "a ReLU, as Kaiming assumes")
            + f" (on_unknown={self.on_unknown!r})",
            stacklevel=4,
        )
        rule = FallbackRule(halve=self.on_unknown == "kaiming")
        self.r.rules[node] = rule
        return rule

    # -- backward ----------------------------------------------------------------------------------
    def backward(self) -> "Pass":
        grads = self.grads
        for out in _flatten(self.outputs):
            if isinstance(out, Signal) and out.const is None:
                self._accumulate(out, Grad.unit(out.shape))
        self.final: dict[fx.Node, Any] = {}
        for node in reversed(self.r.traced.nodes):
            g = grads.pop(node, None)
            if g is None:
                continue
            self.final[node] = g
            ctx = self.contexts.get(node)
            if ctx is None:
                continue
            rule = self.r.rules.get(node)
            if isinstance(rule, WeightRule):
                unit = rule.backward_unit(ctx, g)
                x = rule.input_signal(ctx)
                arrived = self._arrived(x)
                unit = unit.with_(scatter=g.scatter)
                var = self.weights.backward(node, ctx, unit, arrived)
                self.backward_used[node] = var
                var = rule.effective_var(ctx, var)  # what the op uses (a weight-standardized conv: not var)
                contributions = {x: unit if self.local else unit.scaled(var)}
            else:
                contributions = rule.backward(ctx, g)
                contributions = {
                    sig: cg if cg is None else _with_logvar(cg, rule.grad_fluctuation(ctx, g, sig))
                    for sig, cg in contributions.items()
                }
                if self.residual is not None:
                    contributions = self.residual.backward(node, contributions)
            for sig, cg in contributions.items():
                if cg is not None:
                    self._accumulate(sig, cg)
        return self

    def _arrived(self, sig: Signal) -> Grad | None:
        owner = self.owner.get(id(sig))
        if owner is None:
            return None
        g = self.grads.get(owner[0])
        return g if isinstance(g, Grad) else None

    def _accumulate(self, sig: Signal, g: Grad) -> None:
        owner = self.owner.get(id(sig))
        if owner is None:
            return  # a constant, or a value no node produced (a Python number turned tensor)
        node, index = owner
        if g.layout is not sig.layout and g.layout != sig.layout:
            # A gradient is in the layout of the tensor it is at; statistics a rule gave it for the
            # positions of another layout are dropped with it (Grad.with_).
            g = g.with_(layout=sig.layout)
        if index is None:
            prev = self.grads.get(node)
            self.grads[node] = g if prev is None else prev + g
        else:
            slots = self.grads.setdefault(node, [None] * len(self.values[node]))
            slots[index] = g if slots[index] is None else slots[index] + g

    # -- results -----------------------------------------------------------------------------------
    def signal(self, node: fx.Node) -> Signal:
        return self.values[node]

    def grad_at(self, node: fx.Node) -> Grad | None:
        g = self.final.get(node)
        return g if isinstance(g, Grad) else None


def _flatten(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flatten(item)]
    return [value]


def describe_node(node: fx.Node, resolved: Resolved) -> str:
    if node.op == "call_module":
        m = resolved.modules.get(node)
        return f"module {node.target!r} ({type(m).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    where = next(reversed(stack), "") if stack else ""
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", str(node.target))
    kind = "method" if node.op == "call_method" else "function"
    inside = f" in module {where!r}" if where else " in the model's forward"
    return f"{kind} {what!r}{inside}"


def unknown_op_error(node: fx.Node, resolved: Resolved) -> UnknownOpError:
    if node.op == "call_module":
        cls = type(resolved.modules[node]).__name__
        how = f"@initscope.register_rule({cls})"
    elif node.op == "call_function":
        how = f"@initscope.register_rule({getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)})"
    else:
        how = f"@initscope.register_rule({node.target!r})"
    loc = node_location(node)
    return UnknownOpError(
        f"no rule for {describe_node(node, resolved)} at node {node.format_node()}"
        + (f"\n  {loc}" if loc else "")
        + f"\nWhat to do: register a rule with {how} (see initscope.Rule), or pass on_unknown='skip' "
        "(model it as the identity) or on_unknown='kaiming' (model it as a ReLU)."
    )
