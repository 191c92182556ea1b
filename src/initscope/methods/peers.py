"""Other data-free baselines a user would reach for: LeCun, orthogonal, and the modules' own default.

The formulas are in :mod:`initscope.methods.classic`; these are registered after the papers' methods
so that listings and tables keep the papers' order first.
"""

from __future__ import annotations

from initscope.methods.base import Layer, Method, register_method
from initscope.methods.classic import default_bias_bound, default_std, lecun_std, orthogonal_std


@register_method("lecun")
class LeCun(Method):
    summary = "LeCun et al. 1998: var = 1/fan_in"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return lecun_std(layer.fans(options.fan)[0]), False


@register_method("orthogonal")
class Orthogonal(Method):
    summary = "Saxe et al. 2014, gain sqrt(2): orthonormal rows or columns"
    distribution = "orthogonal"
    fixed_distribution = True

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return orthogonal_std(layer.geometry.weight_shape), False


@register_method("default")
class Default(Method):
    summary = "the modules' own reset_parameters (kaiming_uniform, a=sqrt(5))"
    distribution = "uniform"
    fixed_distribution = True
    bias = "default"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return default_std(layer.weight), False

    def bias_m2(self, layer: Layer) -> float:
        # U(-b, b) has second moment b²/3.
        return default_bias_bound(layer.weight) ** 2 / 3.0
