"""Rules: how second moments pass through each op. Importing this package registers the built-in ones."""

from initscope.rules import activation, attention, conv, merge, norm, passthrough, pooling, upsample  # noqa: F401
from initscope.rules.base import Context, LayerGeometry, Rule, WeightRule
from initscope.rules.registry import register_rule, unregister_rule

__all__ = ["Context", "LayerGeometry", "Rule", "WeightRule", "register_rule", "unregister_rule"]
