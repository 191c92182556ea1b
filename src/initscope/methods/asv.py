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

import torch.fx as fx

from initscope.errors import InitscopeError
from initscope.graph.propagate import FixedStds
from initscope.methods.base import Layer, Method, register_method
from initscope.methods.job import Chosen, Job, LayerInfo
from initscope.rules.base import LayerGeometry
from initscope.stats.fluctuation import typical

# Rounds of asv-backward-exact: each layer's std depends on the stds after it through the gradient
# that reaches it, and on those before it through the residual budgets; three rounds settle to 1e-4.
EXACT_ROUNDS = 3


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


@register_method("asv-forward")
class AsvForward(Method):
    summary = "ASV forward (Henmi et al.): var = M'/(tau eps)"
    residual = "scale"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return clamp(asv_forward_std(layer.geometry, layer.tau_in), layer.geometry, "forward", options.max_std_ratio)


@register_method("asv-backward")
class AsvBackward(Method):
    summary = "ASV backward (Henmi et al.): var = M/(gamma eps)"
    direction = "backward"
    residual = "scale"

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        return clamp(asv_backward_std(layer.geometry, layer.gamma), layer.geometry, "backward", options.max_std_ratio)


# -- the exact variants ----------------------------------------------------------------------------
class ExactForward(FixedStds):
    """Chooses each std so that the layer's predicted output second moment is 1."""

    def __init__(self, infos: dict[fx.Node, LayerInfo], ratio: float | None) -> None:
        super().__init__({}, {})
        self.infos, self.ratio = infos, ratio
        self.clamped: set[fx.Node] = set()

    def forward(self, node, ctx, unit):
        if node not in self.stds:
            info = self.infos[node]
            a = typical(unit.mean_m2, unit.scatter.logvar)
            std = math.sqrt(1.0 / a) if a > 0 else math.inf
            std, bit = clamp(std, info.geometry, "forward", self.ratio)
            if not math.isfinite(std):
                raise InitscopeError(f"layer {info.name!r} receives no signal; asv-forward-exact is undefined there")
            # A weight used by several calls is set at its first: the later ones see what it gives.
            for n in info.nodes:
                self.stds[n] = std
            if bit:
                self.clamped.add(info.node)
        return self.stds[node] ** 2, 0.0


class ExactBackward(FixedStds):
    """Chooses each std so that the gradient it sends to its input has second moment 1.

    The first layer of a residual branch gets, under the ``scale`` policy, the target
    ``β E[g²]`` of what the shortcut already sent to the fork.
    """

    def __init__(self, infos, provisional: dict[fx.Node, float], ratio, starts: dict[fx.Node, int], beta: float) -> None:
        super().__init__(dict(provisional), {})
        self.infos, self.ratio = infos, ratio
        self.starts, self.beta = starts, beta
        self.decided: dict[fx.Node, float] = {}
        self.clamped: set[fx.Node] = set()
        self.silent: set[fx.Node] = set()

    def backward(self, node, ctx, unit, arrived):
        info = self.infos[node]
        target = 1.0
        if node in self.starts and arrived is not None and arrived.mean_m2 > 0:
            target = self.beta * arrived.mean_m2 / self.starts[node]
        a = typical(unit.mean_m2, unit.scatter.logvar)
        if a <= 0:
            self.silent.add(node)
            std = self.stds[node]
        else:
            std, bit = clamp(math.sqrt(target / a), info.geometry, "backward", self.ratio)
            if bit:
                self.clamped.add(node)
        self.decided[node] = std
        return std**2


def _by_call(job: Job) -> dict[fx.Node, LayerInfo]:
    """Every call node of every weight, to the weight's :class:`LayerInfo`."""
    return {n: info for info in job.layers for n in info.nodes}


def _per_weight(decided: dict[fx.Node, float], layers: list[LayerInfo]) -> dict[fx.Node, float]:
    """One std per weight from what each of its calls decided: their variances' geometric mean."""
    out = dict(decided)
    for info in layers:
        calls = [n for n in info.nodes if n in decided]
        if len(calls) > 1:
            std = math.exp(sum(math.log(decided[n]) for n in calls) / len(calls)) if all(decided[n] > 0 for n in calls) else 0.0
            for n in info.nodes:
                out[n] = std
    return out


@register_method("asv-forward-exact")
class AsvForwardExact(AsvForward):
    summary = "predicted output second moment 1 at every layer"
    exact = True

    def full_pass(self, job: Job) -> Chosen:
        hook = ExactForward(_by_call(job), job.options.max_std_ratio)
        residual = job.residual()
        final = job.run(hook, residual)
        return Chosen(hook.stds, hook.clamped, final, residual)


@register_method("asv-backward-exact")
class AsvBackwardExact(AsvBackward):
    summary = "predicted input-gradient second moment 1 at every layer"
    exact = True

    def full_pass(self, job: Job) -> Chosen:
        infos = _by_call(job)
        # Under the scale policy a branch whose knob is a weight layer is budgeted at its first
        # layers instead: each start sends back its share of β E[g²] at the fork.
        starts = {}
        if job.policy == "scale":
            for ra in job.adds:
                for b in ra.branches:
                    if b.knob_kind == "weight":
                        for s in b.starts:
                            starts[s] = len(b.starts)
        provisional = dict(job.stds)
        for _ in range(EXACT_ROUNDS):
            residual = job.residual(backward_starts=True)
            hook = ExactBackward(infos, provisional, job.options.max_std_ratio, starts, residual.beta)
            job.run(hook, residual)
            decided = _per_weight(hook.decided, job.layers)
            change = max(abs(decided[n] / provisional[n] - 1) for n in decided) if decided else 0.0
            provisional.update(decided)
            if change < 1e-4:
                break
        notes = [f"{info.name}: no gradient reaches it; kept the paper's std" for info in job.layers
                 if info.node in hook.silent]
        residual = job.residual(decide=False, alphas=residual.alphas, backward_starts=True)
        final = job.run(FixedStds(provisional, job.bias_m2), residual)
        return Chosen(provisional, hook.clamped, final, residual, notes)
