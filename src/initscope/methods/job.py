"""What the planner hands a method's full pass: the traced graph, each layer, the formula stds, and
how to run a propagation with a residual policy.

A method that chooses its stds from the propagation (the exact ASV variants) runs passes through
:meth:`Job.run` with a :class:`~initscope.graph.propagate.WeightHook` of its own and returns a
:class:`Chosen`; every other method takes :meth:`Job.run_fixed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from initscope.graph.propagate import FixedStds, Pass, Replay, Resolved, WeightHook
from initscope.methods.base import Layer, Method, check_finite
from initscope.methods.residual import ResidualAdd, ResidualPolicy
from initscope.stats.signal import Signal

if TYPE_CHECKING:
    from initscope.options import Options


@dataclass
class LayerInfo(Layer):
    """A weight as the planner sees it: a :class:`Layer` (its first call) and where it sits in the graph.

    One weight may be used by several calls: a module called more than once (a tied or recurrent
    conv, a Siamese backbone), or modules that share one ``Parameter``. ``nodes`` holds every call
    and ``views`` what each call sees (its own geometry, τ and γ); the weight gets one std.
    """

    node: fx.Node
    input_node: fx.Node
    bias: nn.Parameter | None
    weight_path: str
    bias_path: str | None
    nodes: list[fx.Node] = field(default_factory=list)
    views: list[Layer] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # other modules that use this weight
    other_bias_paths: list[str] = field(default_factory=list)  # their biases

    @property
    def calls(self) -> int:
        return len(self.nodes)


def weight_std(m: Method, info: LayerInfo, opts: "Options") -> tuple[float, bool]:
    """One std for one weight: the method's, or, for a weight several calls use, the geometric mean of
    the variances the calls ask for. A chain of the calls (a recurrent conv) then has the gain the
    per-call stds would give it together; each call is off by its own factor."""
    if len(info.views) == 1:
        return m.std(info, opts)
    asked = [m.std(view, opts) for view in info.views]
    for (std, _), view in zip(asked, info.views):
        check_finite(std, view, m)
    log_var = sum(2.0 * math.log(std) if std > 0 else -math.inf for std, _ in asked) / len(asked)
    return (math.exp(0.5 * log_var) if math.isfinite(log_var) else 0.0), any(bit for _, bit in asked)


def formula_stds(m: Method, layers: list[LayerInfo], opts: "Options") -> tuple[dict[fx.Node, float], set[fx.Node]]:
    """Every call node's std under ``m``'s formula (one std per weight), and the weights a clamp set."""
    stds, clamped = {}, set()
    for info in layers:
        std, bit = weight_std(m, info, opts)
        check_finite(std, info, m)
        for node in info.nodes:
            stds[node] = std
        if bit:
            clamped.add(info.node)
    return stds, clamped


@dataclass
class Chosen:
    """What a method's full pass decided: each layer's std, which a clamp set, the final propagation
    (its second moments are the plan's predictions), the residual policy it ran with, and notes."""

    stds: dict[fx.Node, float]
    clamped: set[fx.Node]
    final: Pass
    residual: ResidualPolicy
    notes: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One plan in the making (see the module docstring)."""

    resolved: Resolved
    inputs: list[Signal]
    options: "Options"
    layers: list[LayerInfo]
    adds: list[ResidualAdd]
    policy: str
    stds: dict[fx.Node, float]
    clamped: set[fx.Node]
    bias_m2: dict[fx.Node, float]
    knobs: frozenset[fx.Node] = frozenset()
    kept_zero: frozenset[fx.Node] = frozenset()  # norm knobs the model zeroed itself, kept at zero

    def layer(self, node: fx.Node) -> LayerInfo:
        return self._by_node[node]

    @property
    def _by_node(self) -> dict[fx.Node, LayerInfo]:
        cached = self.__dict__.get("_nodes")
        if cached is None:
            cached = self.__dict__["_nodes"] = {info.node: info for info in self.layers}
        return cached

    def residual(self, *, decide: bool = True, alphas: dict[fx.Node, float] | None = None,
                 backward_starts: bool = False) -> ResidualPolicy:
        """The plan's residual policy, ready to run (``decide``: compute each branch's factor)."""
        return ResidualPolicy(self.adds, self.policy, self.options.residual_growth, decide=decide, alphas=alphas,
                              backward_starts=backward_starts, kept_zero=self.kept_zero)

    def run(self, hook: WeightHook, residual: ResidualPolicy) -> Pass:
        """A full propagation, forward then backward, with the weight variances ``hook`` decides.

        Every op runs as in training mode (BatchNorm on batch statistics, dropout active), whatever
        the modules' modes: the stds are chosen for training, which is what an initialization is for.
        """
        return Pass(self.resolved, self.inputs, hook, max_cov=self.options.max_cov_positions,
                    on_unknown=self.options.on_unknown, residual=residual, knobs=self.knobs,
                    for_training=True).forward().backward()

    def in_model_modes(self, chosen: Chosen) -> Pass:
        """``chosen``'s final propagation again, each op in its module's own mode: the same weight
        variances (its hook, replayed), the same residual factors (replayed, not decided again from
        what eval mode would carry), so that only what the modes change moves the predictions."""
        residual = chosen.residual.replay()
        return Pass(self.resolved, self.inputs, Replay(chosen.final), max_cov=self.options.max_cov_positions,
                    on_unknown=self.options.on_unknown, residual=residual, knobs=self.knobs).forward().backward()

    def run_fixed(self) -> Chosen:
        """The full propagation with the formula stds."""
        residual = self.residual()
        final = self.run(FixedStds(self.stds, self.bias_m2), residual)
        return Chosen(dict(self.stds), set(self.clamped), final, residual)
