"""The public entry points: :func:`plan` and :func:`init_`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from initscope import draws
from initscope.draws import Prefetch
from initscope.methods import METHODS
from initscope.options import Options
from initscope.plan import InitPlan, unwrap_model, write_plan
from initscope.planner import build_plan


def plan(
    model: nn.Module,
    method: str,
    *,
    input_shape: Any = None,
    example_input: Any = None,
    cache: bool = True,
    **options: Any,
) -> InitPlan:
    r"""Plan an initialization of every weight layer of ``model``; no weight is changed.

    The plan holds, per Conv1d/2d/3d and Linear layer reached by the forward pass, the std to draw
    its weights with and the second moments that std is predicted to give: ``pred_out_var``, the mean
    :math:`E[u^2]` of the layer's output for i.i.d. N(0, 1) network input, and ``pred_in_grad_var``,
    the mean :math:`E[(\partial L/\partial x)^2]` at its input for i.i.d. N(0, 1) gradients at the
    network's output. Every method is propagated by the same engine, so a Kaiming plan shows where
    Kaiming's signal vanishes as an ASV plan shows where ASV keeps it.

    The stds are chosen for training whatever mode the model is in (BatchNorm on batch statistics,
    dropout active); the predictions are for the modes it is in: in eval mode a BatchNorm divides by
    its running statistics and renormalizes nothing, and the plan's notes say so.

    Methods are registered objects (:data:`initscope.METHODS`, ``initscope methods`` on the command
    line): ``xavier``, ``kaiming-forward``, ``kaiming-backward``, ``asv-forward``, ``asv-backward``
    (Henmi et al., arXiv 2008.06885) and their exact variants, ``lecun``, ``orthogonal``, ``default``,
    and any added with :func:`initscope.register_method`.

    Args:
        model: the network.
        method: the name of a registered method.
        input_shape: the shape of one input sample, without the batch dim, e.g. ``(3, 224, 224)``.
        example_input: a real batch instead of ``input_shape``: its statistics (second moments,
            marginal, correlations) replace the i.i.d. N(0, 1) input.
        cache: reuse the plan of an identical network planned before in this process (same graph,
            hyperparameters, normalization parameters, method, options and input shape; see
            :mod:`initscope.plan_cache`). Planning again gives the same plan; ``False`` recomputes it.
        **options: see :class:`initscope.options.Options` (``distribution``, ``max_std_ratio``, ``fan``,
            ``residual``, ``residual_growth``, ``on_unknown``, ``max_cov_positions``).

    Examples:
        >>> import torchvision, initscope
        >>> p = initscope.plan(torchvision.models.resnet18(), "asv-backward", input_shape=(3, 224, 224))
        >>> print(p.to_table())
    """
    return build_plan(model, method, input_shape, example_input, Options.make(**options), cache=cache)


def init_(
    model: nn.Module,
    method: str,
    *,
    input_shape: Any = None,
    example_input: Any = None,
    generator: torch.Generator | None = None,
    cache: bool = True,
    **options: Any,
) -> InitPlan:
    """Plan an initialization of ``model`` (see :func:`plan`) and write it; returns the plan.

    Examples:
        >>> initscope.init_(model, "asv-forward", input_shape=(3, 64, 64), generator=torch.Generator().manual_seed(0))
    """
    opts = Options.make(**options)
    # The random part of the draw does not depend on the plan: when the plan has to be propagated
    # (it is not in the cache), draw the weights in a thread meanwhile. A remembered plan is written
    # at once, drawing in place, which is cheaper than drawing into buffers and copying.
    ahead = None
    model = unwrap_model(model) if isinstance(model, nn.Module) else model

    def draw_ahead() -> None:
        nonlocal ahead
        if isinstance(model, nn.Module) and method in METHODS and draws.spare_core():
            m = METHODS[method]
            ahead = Prefetch(model, m.law(opts), m.bias == "default", generator)

    try:
        p = build_plan(model, method, input_shape, example_input, opts, cache=cache, on_propagate=draw_ahead)
        write_plan(p, model, generator, ahead)
    finally:
        if ahead is not None:
            ahead.discard()  # joins the thread and gives back torch's threads, whatever happened
    return p
