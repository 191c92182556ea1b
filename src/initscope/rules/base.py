"""The interface every rule implements, and what the propagation hands it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from torch import nn

from initscope.stats.fluctuation import combine
from initscope.stats.signal import Grad, Scatter, Signal

if TYPE_CHECKING:
    import torch.fx


T = TypeVar("T")


@dataclass
class Context:
    """What a rule sees of the node it is applied to, and what rules leave each other there.

    Attributes:
        node: the fx node.
        module: the submodule for ``call_module`` nodes, else None.
        args, kwargs: the node's arguments, with every tensor replaced by its :class:`Signal`.
        out: the forward result (set before ``backward`` is called).
        local: the paper's model, in which every weight layer's output is reset to i.i.d. N(0, 1) (and
            its input gradient to i.i.d. unit entries), so what is measured between weight layers is
            the ASV factors τ and γ.
        plane: maps are infinite planes: pooling windows have their nominal size and do not overlap,
            as the paper assumes.
        max_cov: spatial maps of at most this many positions carry a full covariance.
        knob: the planner's residual policy scales this node (a normalization at the end of a
            residual branch): it is planned as applying the plan will leave it.
        for_training: run every op as in training mode, whatever its module's mode (the passes that
            choose a plan's stds: an initialization is for training). Otherwise each op runs in the
            mode of its module (:attr:`training`), which is what a probe of the model measures.

    What a rule computes in its forward for its own backward (a pooling's window spec, an
    activation's derivative map), or for another rule to read (the residual policy reads which
    activation a node applied), is a typed record kept for this pass: :meth:`put` and :meth:`get`,
    keyed by the record's class. What depends only on the node's own geometry and is worth keeping
    for every pass of a plan (a conv's spec) goes through :meth:`remember`.
    """

    node: "torch.fx.Node"
    module: nn.Module | None
    args: tuple
    kwargs: dict
    local: bool = False
    plane: bool = False
    max_cov: int = 64
    out: Any = None
    knob: bool = False
    for_training: bool = False
    scratch: dict = field(default_factory=dict, repr=False)
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def training(self) -> bool:
        """Whether the op runs as in training mode here: always in a pass ``for_training``, else as
        its module is (the tracer stamps each node with it: ``node.meta["initscope_training"]``)."""
        return self.for_training or bool(self.node.meta.get("initscope_training", False))

    def keep_cov(self, positions: int) -> bool:
        return not self.plane and 1 < positions <= self.max_cov

    def put(self, record: Any) -> None:
        """Keep ``record`` for this node in this pass, under its class."""
        self.scratch[type(record)] = record

    def get(self, kind: type[T]) -> T | None:
        """The record of class ``kind`` this node's rule kept in this pass, if any."""
        return self.scratch.get(kind)

    def remember(self, kind: type[T], key: Any, make: Callable[[], T]) -> T:
        """A record of class ``kind`` derived from the node alone, kept across the passes of a plan
        while ``key`` is unchanged (``make`` builds it when not)."""
        held = self.memo.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        value = make()
        self.memo[kind] = (key, value)
        return value

    @property
    def where(self) -> str:
        """The module path of the node, for messages."""
        if self.module is not None:
            return str(self.node.target)
        stack = self.node.meta.get("nn_module_stack") or {}
        return next(reversed(stack), "") if stack else ""


class Rule:
    """How the statistics of tensors pass through one op.

    ``forward(ctx, *args, **kwargs)`` receives the node's arguments with tensors replaced by
    :class:`Signal` objects and returns the output's Signal (or a tuple of them, or a plain Python
    value for ops like ``size``). ``backward(ctx, grad)`` receives the :class:`Grad` at the output and
    returns a dict mapping each input Signal (the very objects forward received) to its Grad.
    """

    def forward(self, ctx: Context, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, ctx: Context, grad: Grad) -> dict[Signal, Grad]:
        raise NotImplementedError

    def follows_mode(self, node: "torch.fx.Node", module: nn.Module | None) -> bool:
        """Whether what the op does at ``node`` depends on the train/eval mode (dropout, a BatchNorm
        with running statistics). A plan records the modes of such ops' modules, and a probe of the
        model in other modes has its predictions made again for them."""
        return False

    def homogeneous(self, ctx: Context) -> bool:
        """Whether the op is positively homogeneous in its one tensor input at this node (``f(αx) =
        α f(x)`` for α > 0), so a factor on a residual branch passes through it unchanged."""
        return False

    # Finite-width scatter (initscope.stats.fluctuation). The defaults fit ops that mix no channels
    # with their own random weights: one input passes its scatter on, several combine by share.
    def fluctuation(self, ctx: Context, inputs: list[Signal], out: Signal) -> Signal:
        """``out`` with its :class:`~initscope.stats.signal.Scatter` set from the inputs'."""
        if not inputs:
            return out
        if len(inputs) == 1:
            x = inputs[0]
            # A weight layer's ``fresh`` channel count goes on only while the op keeps the channels.
            if out.shape[1:2] == x.shape[1:2]:
                return out.with_(scatter=x.scatter)
            return out.with_(scatter=Scatter(x.scatter.logvar, 0, x.scatter.base_logvar))
        logvar = combine([s.scatter.logvar for s in inputs], [s.mean_m2 for s in inputs])
        return out.with_(scatter=Scatter(logvar))

    def grad_fluctuation(self, ctx: Context, grad: "Grad | list[Grad | None]", x: Signal) -> float:
        """``Var(log g)`` of the gradient this op sends to input ``x``, given ``grad`` at its output
        (one per output for an op that returns several, ``None`` where no gradient arrived)."""
        if isinstance(grad, Grad):
            return grad.scatter.logvar
        arrived = [g for g in grad if g is not None]
        return combine([g.scatter.logvar for g in arrived], [g.mean_m2 for g in arrived]) if arrived else 0.0


@dataclass(frozen=True)
class LayerGeometry:
    """What the initialization methods need to know of one weight layer.

    ``fan_in`` and ``fan_out`` are the true, group-aware fans; ``eps`` counts the (input, output)
    pairs joined by a weight, taps on zero padding excluded; ``m_in`` and ``m_out`` count the scalars
    entering and leaving the layer per sample.
    """

    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    fan_in: int
    fan_out: int
    eps: int
    m_in: int
    m_out: int


class WeightRule(Rule):
    """A layer whose weights initscope draws: Conv*d and Linear.

    Its forward and backward are given for unit weight variance and no bias; the propagation scales
    them by the layer's planned variance and adds the bias's second moment.
    """

    def geometry(self, ctx: Context, *args: Any, **kwargs: Any) -> LayerGeometry:
        raise NotImplementedError

    def weight(self, ctx: Context) -> Any:
        """The parameter this layer's weights live in (for applying the plan)."""
        raise NotImplementedError

    def bias(self, ctx: Context) -> Any:
        raise NotImplementedError

    def forward_unit(self, ctx: Context, *args: Any, **kwargs: Any) -> Signal:
        raise NotImplementedError

    def backward_unit(self, ctx: Context, grad: Grad) -> Grad:
        raise NotImplementedError

    def effective_var(self, ctx: Context, var: float) -> float:
        """The weight variance the op computes with, given the planned one: the same, except for a
        weight the forward pass rescales itself (weight standardization), which ignores it."""
        return var

    def channels(self, ctx: Context) -> int:
        """Output channels with weights of their own (out_features for Linear)."""
        w = self.weight(ctx)
        return int(w.shape[0])

    def input_signal(self, ctx: Context) -> Signal:
        return ctx.args[0]


def bind(args: tuple, kwargs: dict, names: tuple, defaults: dict) -> dict:
    """An op's arguments by name: ``defaults``, then the positional ``args`` in the order of ``names``,
    then ``kwargs`` (how a rule reads ``F.layer_norm(x, shape, weight=...)`` whichever way it was called)."""
    out = dict(defaults)
    out.update(dict(zip(names, args)))
    out.update(kwargs)
    return out
