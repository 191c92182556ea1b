"""Rules for torchvision's own ops, registered when torchvision is imported.

:func:`initscope.graph.trace.trace` imports this module once torchvision is in ``sys.modules``: a model
built from them can only exist after it, and ``import initscope`` (so ``initscope methods``) does not pay
for torchvision's import, which pulls in ``torch._dynamo`` and costs as much as torch's own.
"""

from __future__ import annotations

from torchvision.models.swin_transformer import _get_relative_position_bias, _patch_merging_pad
from torchvision.ops import stochastic_depth
from torchvision.ops.misc import Permute

from initscope.rules.base import Context
from initscope.rules.passthrough import DropoutRule, ShapeRule, _arg
from initscope.rules.registry import register_rule


@register_rule(stochastic_depth)
class StochasticDepthRule(DropoutRule):
    """``torchvision.ops.stochastic_depth(x, p, mode)``: one draw per sample (``row``) or per batch
    (``batch``); the rest is :class:`DropoutRule`'s."""

    def _drop(self, ctx: Context) -> tuple[float, str]:
        if not ctx.node.meta.get("initscope_training", False):
            return 0.0, "element"
        return float(_arg(ctx, 1, "p", 0.0)), _arg(ctx, 2, "mode", "row")


# Permute (ConvNeXt, Swin), Swin's relative position bias (a gather from a parameter table by an index
# buffer: constants) and its patch merging's pad and 2x2 gather only move elements.
register_rule(Permute, _get_relative_position_bias, _patch_merging_pad)(ShapeRule)
