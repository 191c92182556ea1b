"""Rules for timm's building blocks, registered when timm is imported (timm is an optional extra).

:func:`initscope.graph.trace.trace` imports this module once timm is in ``sys.modules``: a timm model
can only exist after it, and initscope never imports timm itself.
"""

from __future__ import annotations

from initscope.rules.conv import StandardizedConv
from initscope.rules.registry import register_rule

try:
    from timm.layers import std_conv as _std_conv
except ImportError:  # pragma: no cover - only imported when timm is
    _std_conv = None

if _std_conv is not None:
    register_rule(*(getattr(_std_conv, name) for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                          "ScaledStdConv2dSame") if hasattr(_std_conv, name)))(
        StandardizedConv)
