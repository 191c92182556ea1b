"""Where a graph forks and joins again: the two sides of a residual add, from the traced graph alone.

Shared by the residual policies (:mod:`initscope.methods.residual`, which then asks the rules what each
side does) and the audit (:mod:`initscope.audit`, which must work on models initscope has no rules for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx


@dataclass(frozen=True)
class Ancestry:
    """Every node's ancestors as a bit mask over the graph's nodes in topological order."""

    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    masks: dict[fx.Node, int]

    @classmethod
    def of(cls, nodes: list[fx.Node]) -> Ancestry:
        index = {n: i for i, n in enumerate(nodes)}
        masks: dict[fx.Node, int] = {}
        for n in nodes:
            mask = 0
            for inp in n.all_input_nodes:
                mask |= masks[inp] | (1 << index[inp])
            masks[n] = mask
        return cls(nodes, index, masks)

    def below(self, node: fx.Node, other: fx.Node) -> bool:
        """Whether ``other`` is an ancestor of ``node``."""
        return bool((self.masks[node] >> self.index[other]) & 1)

    def sides(self, a: fx.Node, b: fx.Node) -> tuple[fx.Node, list[list[fx.Node]]] | None:
        """Where ``a`` and ``b`` fork (their latest common ancestor, or one of them) and, for each, the
        nodes from just after the fork up to and including it, in graph order; None when they share no
        ancestor (two inputs of the model)."""
        full = [self.masks[x] | (1 << self.index[x]) for x in (a, b)]
        common = full[0] & full[1]
        if not common:
            return None
        fork = self.nodes[common.bit_length() - 1]
        bit = 1 << self.index[fork]
        return fork, [[n for n in self.nodes if (mask >> self.index[n]) & 1 and self.masks[n] & bit] for mask in full]
