r"""``asv-balanced``: both exact ASV variants at once, each layer at the geometric mean of their stds.

Forward and backward cannot both be held at 1. In a chain, layer l scales the forward second moment by
:math:`\sigma_l^2 a_l` and the gradient by :math:`\sigma_l^2 b_l`; ``asv-forward-exact`` makes every
:math:`\sigma_l^2 a_l = 1`, which leaves the gradient at the input at :math:`\prod_l b_l/a_l`, and
``asv-backward-exact`` the reverse. That product is the architecture's, not the method's: on the
poster's plain 34-layer net at 72×72 it is :math:`2^{11.8}`, the logits' second moment under
``asv-backward-exact`` (``2^{13}`` under the poster's ASV backward, whose clamp lets the last conv
grow), and the stem's gradient under ``asv-forward-exact`` is :math:`2^{-11.8}`. Taking each layer's
variance as the geometric mean of the two variants',

.. math::
    \sigma_l^2 = \sqrt{\sigma^2_{l,\text{forward}}\,\sigma^2_{l,\text{backward}}},

puts both ends at the square root of the mismatch (:math:`2^{\pm 5.9}` there), as Xavier's
:math:`2/(\mathrm{fan\_in} + \mathrm{fan\_out})` compromises between Kaiming's two fans. Its
predictions are the full propagation's with those stds, like every other method's.
"""

from __future__ import annotations

import dataclasses
import math

from initscope.graph.propagate import FixedStds
from initscope.methods.base import Layer, Method, get_method, register_method
from initscope.methods.job import Chosen, Job, formula_stds


@register_method("asv-balanced")
class AsvBalanced(Method):
    summary = "geometric mean of asv-forward-exact and asv-backward-exact: forward and gradient each off by half"
    residual = "scale"
    exact = True

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return get_method("asv-forward").std(layer, options)

    def full_pass(self, job: Job) -> Chosen:
        runs = []
        for variant, start in (("asv-forward-exact", "asv-forward"), ("asv-backward-exact", "asv-backward")):
            # Each variant from its own starting stds, as it runs on its own.
            stds, clamped = formula_stds(get_method(start), job.layers, job.options)
            runs.append(get_method(variant).full_pass(dataclasses.replace(job, stds=stds, clamped=clamped)))
        forward, backward = runs
        stds = {n: math.sqrt(forward.stds[n] * backward.stds[n]) for n in forward.stds}
        residual = job.residual()
        final = job.run(FixedStds(stds, job.bias_m2), residual)
        notes = list(dict.fromkeys(forward.notes + backward.notes))
        return Chosen(stds, forward.clamped | backward.clamped, final, residual, notes)
