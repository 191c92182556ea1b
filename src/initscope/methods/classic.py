r"""The classical initializations: a std from a layer's fans.

``fan="true"`` counts the fans of grouped and depthwise convolutions as they are:
``fan_in = (C_in/groups) k²`` and ``fan_out = (C_out/groups) k²``. ``fan="framework"`` uses the fans
``torch.nn.init`` computes from the weight's shape, whose ``fan_out`` for a depthwise weight
``(C, 1, k, k)`` is ``C k²``, C times too large (pytorch issue 23854).
"""

from __future__ import annotations

import math

from torch import nn

from initscope.methods.base import Layer, Method, register_method

def xavier_std(fan_in: int, fan_out: int) -> float:
    r"""Glorot and Bengio (2010): :math:`\sigma^2 = 2 / (\mathrm{fan\_in} + \mathrm{fan\_out})`."""
    return math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_std(fan: int) -> float:
    r"""He et al. (2015), for ReLU: :math:`\sigma^2 = 2 / \mathrm{fan}` (fan_in forward, fan_out backward)."""
    return math.sqrt(2.0 / fan)


def lecun_std(fan_in: int) -> float:
    r"""LeCun et al. (1998): :math:`\sigma^2 = 1 / \mathrm{fan\_in}`."""
    return math.sqrt(1.0 / fan_in)


ORTHOGONAL_GAIN = math.sqrt(2.0)


def orthogonal_std(weight_shape: tuple[int, ...]) -> float:
    r"""Entry scale of Saxe et al. (2014)'s orthogonal init with the ReLU gain :math:`\sqrt 2`.

    The weight, flattened to ``(rows, cols)``, has orthonormal rows or columns, whichever are fewer, so
    each entry has second moment :math:`g^2 / \max(\mathrm{rows}, \mathrm{cols})`.
    """
    rows = weight_shape[0]
    cols = math.prod(weight_shape[1:])
    return ORTHOGONAL_GAIN / math.sqrt(max(rows, cols))


def default_std(weight) -> float:
    r"""What ``reset_parameters`` of Conv*d and Linear draws: ``kaiming_uniform_(a=sqrt(5))``.

    That is :math:`U(-b, b)` with :math:`b = 1/\sqrt{\mathrm{fan\_in}}` (framework fan_in), of standard
    deviation :math:`1/\sqrt{3\,\mathrm{fan\_in}}`.
    """
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return 1.0 / math.sqrt(3.0 * fan_in)


def default_bias_bound(weight) -> float:
    """The bound ``1/sqrt(fan_in)`` of the uniform bias ``reset_parameters`` draws."""
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


@register_method("xavier")
class Xavier(Method):
    summary = "Glorot & Bengio 2010: var = 2/(fan_in + fan_out)"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return xavier_std(*layer.fans(options.fan)), False


@register_method("kaiming-forward")
class KaimingForward(Method):
    summary = "He et al. 2015, fan_in: var = 2/fan_in"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return kaiming_std(layer.fans(options.fan)[0]), False


@register_method("kaiming-backward")
class KaimingBackward(Method):
    summary = "He et al. 2015, fan_out: var = 2/fan_out"
    direction = "backward"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return kaiming_std(layer.fans(options.fan)[1]), False
