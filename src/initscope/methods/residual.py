r"""Residual adds: which input is the shortcut, which are branches, and what scales each branch.

A block ``y = x + F(x)`` whose branch F keeps its input's second moment (as ASV forward makes every
branch do) doubles the signal: ``E[y²] = E[x²] + E[F²] = 2 E[x²]``, and B blocks grow it by 2^B. The
backward pass doubles the same way at the fork. Policies (``residual=``):

* ``"none"``: leave branches as the method makes them.
* ``"scale"``: give every block the same share of a total growth ``G`` (``residual_growth``, 2 by
  default): each scalable branch is rescaled so that ``E[F²] = β E[x²]`` at its add, with
  :math:`\beta = G^{1/B} - 1`, and B blocks together grow the signal by exactly G. The rescaling acts
  on the branch's *knob*: the last normalization with an affine weight on the branch (its γ), or else
  the last weight layer (its σ). Between knob and add only positively homogeneous ops may stand
  (ReLU, pooling, shape ops, scalar multiplication), so the knob scales the branch's contribution
  exactly: by α² forward, and the gradient sent into the branch by α² backward.
  ``asv-backward-exact`` budgets the gradient instead: the branch's first weight layer gets the target
  ``β E[g_x²]`` for what it sends back to the fork.
* ``"zero"``: knobs at zero, as Fixup and SkipInit start (torchvision's ``zero_init_residual`` for
  normalized branches): every block is the identity at initialization.

A branch that scales itself (a learnable layer scale, as in ConvNeXt) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Number

import torch.fx as fx

from initscope.graph.branches import Ancestry
from initscope.graph.propagate import Pass, Resolved, ResidualHook
from initscope.options import POLICIES  # noqa: F401  (the policies this module implements)
from initscope.rules.activation import ElementwiseRule
from initscope.rules.base import WeightRule
from initscope.rules.merge import AddRule, MulRule, SubRule
from initscope.rules.norm import NormRule
from initscope.stats.signal import Signal



@dataclass
class Branch:
    input: fx.Node
    knob: fx.Node | None
    knob_kind: str | None  # "weight" or "norm"
    starts: list[fx.Node]
    reason: str = ""
    weights: list[fx.Node] = field(default_factory=list)  # every weight layer on the branch, in graph order


@dataclass
class ResidualAdd:
    node: fx.Node
    fork: fx.Node
    main: fx.Node
    branches: list[Branch] = field(default_factory=list)


def _tensor_input(n: fx.Node, values: dict) -> bool:
    v = values.get(n)
    return isinstance(v, Signal) and v.const is None


def find_residual_adds(resolved: Resolved, probe: Pass) -> list[ResidualAdd]:
    """The residual adds of a graph (``probe`` is any forward pass, for which inputs are tensors)."""
    nodes = resolved.traced.nodes
    ancestry = Ancestry.of(nodes)
    found = []
    for node in nodes:
        rule = resolved.rules.get(node)
        if not isinstance(rule, AddRule) or isinstance(rule, SubRule) or node not in probe.contexts:
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, fx.Node) and _tensor_input(a, probe.values)]
        if len(inputs) != 2 or inputs[0] is inputs[1]:
            continue
        forked = ancestry.sides(*inputs)
        if forked is None:
            continue
        fork, members = forked
        weights = [[n for n in m if resolved.is_weight(n)] for m in members]
        identity = [i for i in range(2) if not weights[i]]
        if len(identity) == 2:
            continue
        main = identity[0] if identity else min(range(2), key=lambda i: (len(weights[i]), i))
        ra = ResidualAdd(node, fork, inputs[main])
        for i in range(2):
            if i == main:
                continue
            knob, kind, reason = _knob(inputs[i], fork, resolved, probe)
            branch_weights = set(weights[i])
            starts = [w for w in weights[i] if not any(ancestry.below(w, o) for o in branch_weights if o is not w)]
            ra.branches.append(Branch(inputs[i], knob, kind, starts, reason, list(weights[i])))
        found.append(ra)
    return found


def _adds_zero(ctx) -> bool:
    """Whether every operand of an add but the tensor is a constant that is zero (a bias still at its init)."""
    others = [a for a in ctx.args if not (isinstance(a, Signal) and a.const is None)]
    return bool(others) and all(
        (isinstance(a, Number) and a == 0) or (isinstance(a, Signal) and a.const is not None and not a.const.any())
        for a in others)


def _knob(start: fx.Node, fork: fx.Node, resolved: Resolved, probe: Pass) -> tuple[fx.Node | None, str | None, str]:
    """Walk back from a branch's end through homogeneous ops to what scales it."""
    node = start
    while node is not fork:
        rule = resolved.rules.get(node)
        if isinstance(rule, WeightRule):
            return node, "weight", ""
        if isinstance(rule, NormRule):
            module = resolved.modules.get(node)
            if module is not None and getattr(module, "weight", None) is not None:
                return node, "norm", ""
            return None, None, f"normalization {node.name} has no affine weight to scale"
        ctx = probe.contexts.get(node)
        if ctx is None:
            return None, None, f"{node.name} is not a tensor op"
        sources = [a for a in node.all_input_nodes if _tensor_input(a, probe.values)]
        if isinstance(rule, MulRule):
            consts = [a for a in ctx.args if not (isinstance(a, Signal) and a.const is None)]
            if any(isinstance(c, Signal) and c.const is not None and c.const.numel() > 1 for c in consts):
                return None, None, f"the branch scales itself ({node.name} multiplies it by a parameter: a layer scale)"
            if len(sources) != 1 or not all(isinstance(c, (Number, Signal)) for c in consts):
                return None, None, f"{node.name} multiplies the branch by a tensor computed in the forward pass"
        elif isinstance(rule, AddRule) and len(sources) == 1 and _adds_zero(ctx):
            pass  # a bias that is zero at init (Fixup's scalar biases): the branch passes through unchanged
        elif not rule.homogeneous(ctx):
            if isinstance(rule, ElementwiseRule):
                return None, None, f"{node.name} is not positively homogeneous"
            return None, None, f"{node.name} stands between the branch's last layer and the add"
        if len(sources) != 1:
            return None, None, f"{node.name} merges several tensors"
        node = sources[0]
    return None, None, "no weight layer or normalization on the branch"


class ResidualPolicy(ResidualHook):
    """Applies a residual policy while a forward pass runs, and mirrors it in the backward pass.

    ``decide=True`` computes each branch's factor α at its add from the arriving second moments;
    otherwise the factors in ``alphas`` are replayed. The add receives the branch scaled by α², and
    the gradient it sends into the branch is scaled by α², as moving the knob would do.
    """

    def __init__(self, adds: list[ResidualAdd], policy: str, growth: float, decide: bool = True,
                 alphas: dict[fx.Node, float] | None = None, backward_starts: bool = False,
                 kept_zero: frozenset[fx.Node] = frozenset()) -> None:
        self.adds, self.growth = adds, growth
        self.by_node = {ra.node: ra for ra in adds}
        self.policy = policy
        # Knobs the model zeroed itself (a zero_init_last BatchNorm): they stay at zero.
        self.kept_zero = kept_zero
        count = max(len(adds), 1)
        self.beta = growth ** (1.0 / count) - 1.0
        self.decide = decide
        self.alphas: dict[fx.Node, float] = dict(alphas or {})
        # Branches whose budget the exact backward variant sets at their first layer instead.
        self.backward_starts = backward_starts
        self.scaled: dict[int, tuple[Signal, float]] = {}
        self.skipped: list[str] = []

    def replay(self) -> "ResidualPolicy":
        """The same policy with the factors it decided, for another pass over the same graph."""
        return ResidualPolicy(self.adds, self.policy, self.growth, decide=False, alphas=self.alphas,
                              backward_starts=self.backward_starts, kept_zero=self.kept_zero)

    def handles(self, branch: Branch) -> bool:
        if branch.knob is None:
            return False
        return not (self.backward_starts and branch.knob_kind == "weight" and self.policy == "scale")

    def forward(self, node: fx.Node, args: tuple, values: dict) -> tuple:
        ra = self.by_node.get(node)
        if ra is None or self.policy == "none":
            return args
        args = list(args)
        positions = {a: i for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)}
        main = values[ra.main]
        scalable = [b for b in ra.branches if self.handles(b)]
        for b in ra.branches:
            if b.knob is None and self.decide:
                self.skipped.append(f"{node.name}: {b.reason}")
        for b in scalable:
            sig = values[b.input]
            if self.decide:
                if self.policy == "zero" or b.knob in self.kept_zero:
                    alpha2 = 0.0
                else:
                    alpha2 = self.beta * main.mean_m2 / (len(scalable) * sig.mean_m2) if sig.mean_m2 > 0 else 1.0
                self.alphas[b.knob] = alpha2**0.5
            alpha2 = self.alphas.get(b.knob, 1.0) ** 2
            scaled = sig.scaled(alpha2)
            self.scaled[id(scaled)] = (sig, alpha2)
            args[positions[b.input]] = scaled
        return tuple(args)

    def backward(self, node: fx.Node, contributions: dict) -> dict:
        if node not in self.by_node or self.policy == "none":
            return contributions
        out = {}
        for sig, g in contributions.items():
            scaled = self.scaled.get(id(sig))
            if scaled is None:
                out[sig] = g
            else:
                original, alpha2 = scaled
                out[original] = g.scaled(alpha2)
        return out
