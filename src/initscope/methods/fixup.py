r"""Fixup (Zhang, Dauphin and Ma, ICLR 2019): residual networks trained without normalization.

For a network of L residual branches with m weight layers each:

1. the classifier and the last layer of every residual branch start at zero, so every block is the
   identity and the output is zero;
2. every other layer is drawn as Kaiming fan_in would, and those inside residual branches are scaled
   by :math:`L^{-1/(2m-2)}`:

.. math::
    \sigma_l = \sqrt{2/\mathrm{fan\_in}_l}\; L^{-1/(2m-2)} \quad (l \text{ inside a branch, not its last layer})

3. (architecture, not initialization) a scalar multiplier (1) on each branch and a scalar bias (0)
   before each convolution, linear layer and activation. initscope's CIFAR-style ResNets build them
   with ``fixup_scalars=True``; this method writes the weights of any residual net.

With the classifier at zero, no gradient reaches the layers below it at initialization (only the
classifier learns in the first step); the plan's gradient predictions are then zero, and it says so.
Fixup is meant for networks without normalization: a branch with one after its last layer is noted.
"""

from __future__ import annotations

import math

import torch.fx as fx

from initscope.graph.propagate import FixedStds
from initscope.methods.base import Layer, Method, register_method
from initscope.methods.classic import kaiming_std
from initscope.methods.job import Chosen, Job


def fixup_scale(branches: int, depth: int) -> float:
    r""":math:`L^{-1/(2m-2)}` for L residual branches of m weight layers (1 for a one-layer branch)."""
    if branches < 1 or depth < 2:
        return 1.0
    return branches ** (-1.0 / (2 * depth - 2))


def _outputs(job: Job) -> set[fx.Node]:
    """The weight layers no other weight layer comes after: the classifier(s)."""
    weights = {n for info in job.layers for n in info.nodes}
    last = set()
    for info in job.layers:
        seen, stack, downstream = set(), list(info.node.users), False
        while stack and not downstream:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            downstream = n in weights
            stack.extend(n.users)
        if not downstream:
            last.add(info.node)
    return last


@register_method("fixup")
class Fixup(Method):
    summary = "Zhang et al. 2019: branch ends and classifier 0, branches scaled by L^(-1/(2m-2))"
    residual = "none"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return kaiming_std(layer.fans(options.fan)[0]), False

    def full_pass(self, job: Job) -> Chosen:
        stds = dict(job.stds)
        branches = [b for ra in job.adds for b in ra.branches if b.weights]
        notes = []
        for b in branches:
            scale = fixup_scale(len(branches), len(b.weights))
            # The branch's last weight layer, whatever scalar multipliers and biases follow it.
            last = b.weights[-1]
            for w in b.weights:
                for n in job.layer(w).nodes:
                    stds[n] = 0.0 if w is last else stds[n] * scale
            if b.knob_kind == "norm":
                notes.append(f"fixup: the branch ending at {b.input.name} has a normalization after its last "
                             "layer; Fixup is meant for networks without one")
        for node in _outputs(job):
            for n in job.layer(node).nodes:
                stds[n] = 0.0
        notes.append("fixup: the classifier starts at zero, so no gradient reaches the layers below it at "
                     "initialization; the gradient predictions are zero")
        if not branches:
            notes.append("fixup: no residual branch found; every layer but the classifier is Kaiming fan_in")
        residual = job.residual()
        final = job.run(FixedStds(stds, job.bias_m2), residual)
        return Chosen(stds, set(job.clamped), final, residual, notes)
