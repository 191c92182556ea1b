r"""Adaptive Signal Variance (Henmi, Zara, Hirohashi, Kato; arXiv 2008.06885), and its exact variants.

The paper's two variants, with ε the number of (input, output) pairs a layer's weights join (taps on
zero padding excluded), M and M' the scalars entering and leaving the layer, τ the second moment of
the block before it and γ the gradient factor of the block after it (see ``docs/theory.md``):

.. math::
    \sigma^2_{\text{forward}} = \frac{M'_l}{\tau_{l-1}\,\varepsilon_l} \qquad
    \sigma^2_{\text{backward}} = \frac{M_{l-1}}{\gamma_l\,\varepsilon_l}

The authors' code clamps σ to at most ``max_std_ratio`` times the same formula with τ (or γ) = 1/2.

The exact variants replace the paper's τ and γ (which assume every position of a map is alike and
every pooling window independent) by what the full propagation predicts: ``asv-forward-exact``
chooses each σ so that the layer's predicted output second moment is 1, ``asv-backward-exact`` so
that the predicted gradient second moment at its input is 1.
"""

from __future__ import annotations

import math

from initscope.rules.base import LayerGeometry


def _check_eps(geometry: LayerGeometry) -> None:
    if geometry.eps <= 0:
        raise ValueError(
            f"a {geometry.kind} layer with weight {tuple(geometry.weight_shape)} reads nothing but padding on this "
            "input (eps = 0): its outputs do not depend on its weights; check input_shape, padding and stride"
        )


def asv_forward_std(geometry: LayerGeometry, tau_in: float) -> float:
    r""":math:`\sigma^2 = M' / (\tau \varepsilon)`: keeps the forward second moment (ASV forward)."""
    _check_eps(geometry)
    return math.sqrt(geometry.m_out / (tau_in * geometry.eps)) if tau_in > 0 else math.inf


def asv_backward_std(geometry: LayerGeometry, gamma: float) -> float:
    r""":math:`\sigma^2 = M / (\gamma \varepsilon)`: keeps the gradient's second moment (ASV backward)."""
    _check_eps(geometry)
    return math.sqrt(geometry.m_in / (gamma * geometry.eps)) if gamma > 0 else math.inf


def base_std(geometry: LayerGeometry, direction: str) -> float:
    """The clamp's reference: the ASV formula with τ or γ replaced by 1/2 (Kaiming with exact borders)."""
    return asv_forward_std(geometry, 0.5) if direction == "forward" else asv_backward_std(geometry, 0.5)


def clamp(std: float, geometry: LayerGeometry, direction: str, ratio: float | None) -> tuple[float, bool]:
    """``min(std, ratio * base_std)``, and whether the clamp bit."""
    if ratio is None:
        return std, False
    limit = ratio * base_std(geometry, direction)
    return (limit, True) if std > limit else (std, False)
