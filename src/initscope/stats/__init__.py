"""The statistics that stand in for tensors during propagation, and the math they need."""

from initscope.stats.dist import Dist
from initscope.stats.signal import Grad, Signal

__all__ = ["Dist", "Grad", "Signal"]
