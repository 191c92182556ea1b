"""Building a plan: trace, propagate the paper's model for τ and γ, choose stds, propagate predictions.

The steps, for any method:

1. Trace the model and look up a rule for every op.
2. The paper's model (``local``, ``plane``): every weight layer's output reset to i.i.d. N(0, 1) and
   its input gradient to unit entries. What reaches each layer's input is τ, what reaches its output
   from behind is γ.
3. Each layer's std: from its fans, from τ and γ (ASV), or, for the exact variants, chosen during the
   full propagation from what it predicts.
4. The full propagation with those stds: per-position maps, correlations, border counts, overlapping
   windows. Its second moments at each layer are the plan's predictions. The residual policy acts in
   this pass.
5. Where some op that depends on its mode runs in eval mode (a BatchNorm dividing by its running
   statistics, a dropout that is off), step 4 again with the same stds and residual factors, each op
   in its module's mode: its second moments are then the predictions, and a note says so.

Steps 2-4 run every op as in training mode (BatchNorm on batch statistics, dropout active): an
initialization is for training, so a model planned in eval mode gets the stds it would get in train
mode, while its predictions (5) are for what it does in the modes it is in. :func:`in_modes` makes a
plan again for the model's modes as they are now: what a probe of the model in other modes than it was
planned in sets beside its measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.fx as fx
from torch import nn

from initscope import plan_cache
from initscope.errors import InitscopeError
from initscope.graph.propagate import Pass, Resolved, WeightHook
from initscope.graph.trace import trace
from initscope.methods import METHODS, Method, get_method
from initscope.methods.base import Layer
from initscope.methods.job import Job, LayerInfo, formula_stds
from initscope.methods.residual import ResidualAdd, find_residual_adds
from initscope.options import Options
from initscope.plan import InitPlan, LayerPlan, unwrap_model
from initscope.rules.base import WeightRule
from initscope.rules.norm import NormRule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.fluctuation import typical
from initscope.stats.signal import Shared, Signal, Spatial
from initscope.threads import one_intra_op_thread


class _Unit(WeightHook):
    """The paper's model: every weight layer's output reset to unit second moment."""

    def forward(self, node, ctx, unit):
        return 1.0, 0.0

    def backward(self, node, ctx, unit, arrived):
        return 1.0


# -- inputs ----------------------------------------------------------------------------------------
def _input_shapes(input_shape: Any) -> list[tuple[int, ...]]:
    if isinstance(input_shape, torch.Size) or (
        isinstance(input_shape, (tuple, list)) and input_shape and all(isinstance(d, int) for d in input_shape)
    ):
        shapes = [tuple(input_shape)]
    elif isinstance(input_shape, (tuple, list)) and input_shape and all(isinstance(s, (tuple, list, torch.Size)) for s in input_shape):
        shapes = [tuple(s) for s in input_shape]
    else:
        raise ValueError(
            f"input_shape={input_shape!r} must be the shape of one sample, without the batch dim, e.g. (3, 224, 224)"
            " (or a list of such shapes for a model with several inputs)"
        )
    for s in shapes:
        if not all(isinstance(d, int) and d > 0 for d in s):
            raise ValueError(f"input_shape={input_shape!r}: every dim must be a positive integer")
    return shapes


def signal_of_batch(x: torch.Tensor, max_cov: int) -> Signal:
    """The statistics of a real batch: per-element second moments, marginal, correlations."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("example_input must be a tensor (or tuple of tensors) with a batch dim first")
    x = x.detach().to("cpu", DTYPE)
    if not torch.isfinite(x).all():
        raise ValueError("example_input contains NaN or infinite values")
    b = x.shape[0]
    shape = torch.Size((1, *x.shape[1:]))
    m2 = (x**2).mean(0, keepdim=True)
    total = float(m2.mean())
    if total <= 0:
        raise ValueError("example_input is all zeros")
    flat = x.reshape(-1)
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    dist = Dist.of(sample / math.sqrt(total), torch.ones_like(sample)).standardized()
    mean = x.mean(0)
    xcorr = float(((mean**2) * b - m2[0]).mean() / (b - 1) / total) if b > 1 else 0.0
    cov, rho = None, 0.0
    if x.ndim >= 3:
        d = int(torch.Size(x.shape[2:]).numel())
        pos = x.reshape(b * x.shape[1], d)
        if 1 < d <= max_cov:
            cov = (pos.T @ pos / pos.shape[0]).reshape(*x.shape[2:], *x.shape[2:])
        elif d > 1:
            s = pos.sum(1)
            rho = float(((s**2) - (pos**2).sum(1)).mean() / (d * (d - 1)) / total)
    return Signal(shape, m2, spatial=Spatial(cov, rho), shared=Shared(xcorr), dist=dist)


def make_inputs(input_shape, example_input, max_cov: int) -> tuple[list[Signal], list[Signal], Any]:
    """Input statistics for the full model and for the paper's model, and the shape(s) to report."""
    if (input_shape is None) == (example_input is None):
        raise ValueError("pass exactly one of input_shape=(C, H, W) (one sample, no batch dim) or example_input=<batch>")
    if example_input is not None:
        batch = list(example_input) if isinstance(example_input, (tuple, list)) else [example_input]
        full = [signal_of_batch(x, max_cov) for x in batch]
        shapes = [tuple(s.shape[1:]) for s in full]
    else:
        shapes = _input_shapes(input_shape)
        full = [Signal.unit(torch.Size((1, *s))) for s in shapes]
    local = [Signal.unit(s.shape, s.mean_m2) for s in full]
    report = shapes[0] if len(shapes) == 1 else shapes
    return full, local, report


# -- planning --------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(m, "_orig_mod"):
            raise TypeError(
                f"{type(m).__name__} wraps a model inside {type(model).__name__}: plan the model it wraps "
                "(its .module, or ._orig_mod for torch.compile)"
            )
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"module {name or type(model).__name__!r} ({type(module).__name__}) has a parameter {pname!r} "
                    "that is not materialized yet (a lazy module): run one forward pass on an example batch first"
                )


def _layer_infos(resolved: Resolved, local: Pass) -> list[LayerInfo]:
    """One :class:`LayerInfo` per weight reached by the forward pass, with every call that uses it."""
    infos: dict[int, LayerInfo] = {}
    for node in resolved.traced.nodes:
        if not resolved.is_weight(node) or node not in local.contexts:
            continue
        rule: WeightRule = resolved.rules[node]
        ctx = local.contexts[node]
        weight, bias = rule.weight(ctx), rule.bias(ctx)
        if node.op == "call_module":
            name = str(node.target)
            weight_path = f"{name}.weight"
            bias_path = f"{name}.bias" if bias is not None else None
        else:
            weight_path = str(node.args[1].target if len(node.args) > 1 else node.kwargs["weight"].target)
            name = weight_path.rsplit(".", 1)[0] if "." in weight_path else weight_path
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias_path = str(b.target) if isinstance(b, fx.Node) else None
        x = rule.input_signal(ctx)
        g = local.grad_at(node)
        view = Layer(name, rule.geometry(ctx, *ctx.args, **ctx.kwargs), weight, x.mean_m2,
                     g.mean_m2 if g is not None else 0.0)
        known = infos.get(id(weight))
        if known is not None:
            # Another call of the same weight: a module called again, or a module sharing the Parameter.
            known.nodes.append(node)
            known.views.append(view)
            if name != known.name and name not in known.shared:
                known.shared.append(name)
                if bias_path is not None and bias_path != known.bias_path:
                    known.other_bias_paths.append(bias_path)
            continue
        input_node = _same_tensor(resolved, node.args[0] if node.args else node.kwargs.get("input"))
        info = LayerInfo(
            name=name,
            geometry=view.geometry,
            weight=weight,
            tau_in=view.tau_in,
            gamma=view.gamma,
            node=node,
            input_node=input_node,
            bias=bias,
            weight_path=weight_path,
            bias_path=bias_path,
        )
        info.nodes.append(node)
        info.views.append(info)
        infos[id(weight)] = info
    return list(infos.values())


def _same_tensor(resolved: Resolved, node: Any) -> Any:
    """The node whose tensor ``node``'s is: an ``nn.Identity`` hands its input on as the very same
    tensor, so the gradient a user measures at a layer's input is the one at the tensor before it (a
    CIFAR ResNet with its norms and Fixup scalars removed reads ``conv1(identity(x))`` beside the
    shortcut's ``x``: the gradient there is the branch's and the shortcut's together)."""
    while isinstance(node, fx.Node) and node.op == "call_module" and type(resolved.modules.get(node)) is nn.Identity:
        node = node.args[0]
    return node


def _zeroed_knobs(resolved: Resolved, knobs: frozenset[fx.Node]) -> frozenset[fx.Node]:
    """The knob normalizations whose weight the model set to zero itself (torchvision's
    ``zero_init_residual``, timm's ``zero_init_last``): a convention the plan keeps unless asked."""
    zeroed = set()
    for node in knobs:
        weight = getattr(resolved.modules.get(node), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() and bool((weight.detach() == 0).all()):
            zeroed.add(node)
    return frozenset(zeroed)


def _norm_knobs(resolved: Resolved, adds: list[ResidualAdd]) -> tuple[frozenset[fx.Node], bool]:
    """The normalizations that scale a residual branch, and whether any holds other than γ = 1, β = 0."""
    knobs, changed = set(), False
    for ra in adds:
        for b in ra.branches:
            if b.knob_kind != "norm":
                continue
            knobs.add(b.knob)
            module = resolved.modules.get(b.knob)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            with torch.no_grad():
                if weight is not None and not bool((weight == 1).all()):
                    changed = True
                if bias is not None and not bool((bias == 0).all()):
                    changed = True
    return frozenset(knobs), changed


def _paper_model(resolved: Resolved, inputs: list[Signal], opts: Options, shape: Any,
                 knobs: frozenset[fx.Node] = frozenset()) -> Pass:
    """The paper's model (every weight layer's output reset to i.i.d. N(0, 1)), forward and backward."""
    return _propagating(lambda: Pass(resolved, inputs, _Unit(), local=True, plane=True, on_unknown=opts.on_unknown,
                                     knobs=knobs, for_training=True).forward().backward(), shape)


T = TypeVar("T")


def _propagating(run: Callable[[], T], shape) -> T:
    """``run()``, a propagation over the traced model: an error of a rule's arithmetic (the model does not
    run on ``shape``) becomes :func:`_not_run`'s, initscope's own errors pass as they are."""
    try:
        return run()
    except InitscopeError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise _not_run(exc, shape) from exc


def _not_run(exc: Exception, shape: Any) -> ValueError:
    """The error for a propagation that failed inside a rule: a model that does not run on the input."""
    if "meta tensor" in str(exc):
        return ValueError(
            "the model is on the meta device, and planning reads the values of its normalization (and other "
            "non-weight) parameters, which a meta tensor does not have: materialize it first "
            "(model.to_empty(device='cpu') and its own reset_parameters, or build it outside torch.device('meta'))"
        )
    return ValueError(f"the model does not run on input_shape={shape!r}: {exc}")


def build_plan(
    model: nn.Module,
    method: "str | Method",
    input_shape: Any = None,
    example_input: Any = None,
    options: Options | None = None,
    cache: bool = True,
    on_propagate: Callable[[], None] | None = None,
) -> InitPlan:
    """The plan of ``model`` (see :func:`initscope.plan`).

    ``on_propagate`` is called once the plan is known to need propagating (it was not in the cache),
    before the propagation starts: :func:`initscope.init_` starts drawing the weights there.
    """
    opts = options or Options()
    # A registered method by name, or a Method object of the caller's own (initscope.audit plans the
    # weights a model holds with one that is not registered).
    m: Method = method if isinstance(method, Method) else get_method(method)
    m.check(opts, example_input)
    model = unwrap_model(model)
    _check_model(model)
    full_inputs, local_inputs, shape = make_inputs(input_shape, example_input, opts.max_cov_positions)
    recipe = Recipe(m, opts, full_inputs, local_inputs, shape, example_input is None)
    result = _make(model, recipe, cache, on_propagate)
    if m.needs_data:
        result.example = example_input
    return result


@dataclass(frozen=True)
class Recipe:
    """What a plan is made from besides the model: the method, the options and the input statistics.

    A plan keeps it (not serialized) so that :func:`in_modes` can make it again for the model in
    other modes than it was planned in; it holds no reference to the model.
    """

    method: Method
    options: Options
    full_inputs: list[Signal]
    local_inputs: list[Signal]
    shape: Any
    gaussian_inputs: bool  # i.i.d. N(0, 1) of ``shape``, not a batch's statistics: the plan cache may key it


def _make(model: nn.Module, recipe: Recipe, cache: bool = True,
          on_propagate: Callable[[], None] | None = None) -> InitPlan:
    m, opts = recipe.method, recipe.options
    resolved = Resolved.of(trace(model))
    cacheable = cache and recipe.gaussian_inputs and not m.reads_weights
    key = plan_cache.plan_key(resolved, m, opts.to_dict(), recipe.shape) if cacheable else None
    remembered = plan_cache.lookup(key)
    if remembered is not None:
        remembered.recipe = recipe
        return remembered
    if on_propagate is not None:
        on_propagate()
    with one_intra_op_thread():
        result = _propagate(model, m, resolved, recipe.full_inputs, recipe.local_inputs, recipe.shape, opts)
    plan_cache.store(key, result)
    result.recipe = recipe
    return result


def in_modes(model: nn.Module, plan: InitPlan) -> InitPlan:
    """``plan`` made again for ``model`` with its modules in the modes they are in now.

    The stds are chosen for training whatever the modes, so they come out as the plan's while the
    model is the one planned; the predictions are for the modes now (a BatchNorm in eval mode divides by
    its running statistics). Raises :class:`~initscope.errors.InitscopeError` when the plan does not
    say what it was made from (its method is not registered, or it was made from a batch and not
    kept in this process).
    """
    model = unwrap_model(model)
    recipe = plan.recipe
    if recipe is None:
        if plan.method not in METHODS or not isinstance(plan.input_shape, (tuple, list)):
            raise InitscopeError(
                f"the plan ({plan.method}) cannot be made again for the model's modes: its method is not registered "
                "or it was made from an example batch in another process; plan the model again in the modes it "
                "is probed in (initscope.plan(model.eval(), ...))"
            )
        opts = Options.make(**plan.options)
        full, local, shape = make_inputs(plan.input_shape, None, opts.max_cov_positions)
        recipe = Recipe(METHODS[plan.method], opts, full, local, shape, True)
    again = _make(model, recipe)
    again.example = plan.example
    return again


def mode_dependent(resolved: Resolved) -> dict[fx.Node, str]:
    """The nodes whose op depends on the train/eval mode, each with the module it takes its mode from."""
    found = {}
    for node in resolved.traced.nodes:
        rule = resolved.rules.get(node)
        if rule is not None and rule.follows_mode(node, resolved.modules.get(node)):
            found[node] = str(node.meta.get("initscope_mode_of", ""))
    return found


def _modes_note(resolved: Resolved, evaluated: list[fx.Node]) -> str:
    """The plan's note for a model planned with some mode-dependent ops in eval mode."""
    norms = sum(isinstance(resolved.rules.get(n), NormRule) for n in evaluated)
    others = len(evaluated) - norms
    parts = []
    if norms:
        parts.append(f"{norms} normalization(s) divide by their running statistics")
    if others:
        parts.append(f"{others} dropout op(s) pass their input unchanged")
    return ("planned for training (stds chosen with BatchNorm on batch statistics and dropout active, as "
            "training runs them); the predictions follow the model's eval mode: " + " and ".join(parts))


def _propagate(model: nn.Module, m: Method, resolved: Resolved, full_inputs: Any, local_inputs: Any,
               shape: Any, opts: Options) -> InitPlan:
    """The plan, computed: the paper's model, the stds, then the full propagation."""
    policy = opts.residual or m.residual
    # The paper's model: τ and γ of every layer.
    local = _paper_model(resolved, local_inputs, opts, shape)
    adds = find_residual_adds(resolved, local)
    knobs: frozenset[fx.Node] = frozenset()
    kept_zero: frozenset[fx.Node] = frozenset()
    if policy != "none":
        knobs, changed = _norm_knobs(resolved, adds)
        if opts.residual is None and policy != "zero":
            # The method's default policy does not overwrite what the model zeroed on purpose; an
            # explicit residual="scale" does.
            kept_zero = _zeroed_knobs(resolved, knobs)
        if changed:
            # Some knob holds a weight or bias the plan will overwrite: plan the paper's model again as
            # it will be after applying, so that planning twice gives the same plan.
            local = _paper_model(resolved, local_inputs, opts, shape, knobs)
    infos = _layer_infos(resolved, local)
    if not infos:
        raise ValueError(
            f"{type(model).__name__} has no Conv1d/2d/3d or Linear layer reached by its forward pass: nothing to initialize"
        )

    # Stds from the method's formula (the exact variants start from the paper's); every call of a
    # weight gets the weight's std.
    stds, clamped = formula_stds(m, infos, opts)
    bias_m2 = {info.node: m.bias_m2(info) for info in infos if info.bias is not None and m.bias_m2(info)}

    # The full propagation, in which a method may choose its stds.
    job = Job(resolved, full_inputs, opts, infos, adds, policy, stds, clamped, bias_m2, knobs, kept_zero)
    chosen = _propagating(lambda: m.full_pass(job), shape)
    stds, clamped, final, residual = chosen.stds, chosen.clamped, chosen.final, chosen.residual
    notes = list(chosen.notes) + [f"residual policy not applied at {s}" for s in residual.skipped]
    # The stds are for training; the predictions for the modes the model is in.
    dependent = mode_dependent(resolved)
    evaluated = [n for n in dependent if not n.meta.get("initscope_training", False)]
    if evaluated:
        final = _propagating(lambda: job.in_model_modes(chosen), shape)
        notes.append(_modes_note(resolved, evaluated))
    modes = {owner: bool(node.meta.get("initscope_training", False)) for node, owner in dependent.items()}
    if kept_zero:
        notes.append(f"kept at zero what the model zeroed itself: {len(kept_zero)} normalization weight(s) at the "
                     f"end of residual branches ({', '.join(sorted(str(n.target) for n in kept_zero)[:4])}"
                     f"{', ...' if len(kept_zero) > 4 else ''}); pass residual='scale' to rescale them")

    distribution = m.law(opts)
    by_node = {info.node: info for info in infos}
    norm_scales = {str(node.target): alpha for node, alpha in residual.alphas.items() if node not in by_node}
    written = [name for name in norm_scales if not any(str(n.target) == name for n in kept_zero)]
    if written:
        # Everything the plan writes beyond the weight layers (and their biases) is said.
        notes.append(f"besides the weight layers, applying writes {len(written)} normalization weight(s) at the end "
                     f"of residual branches (the {policy} policy's scale) and zeroes their biases: "
                     f"{', '.join(written[:4])}{', ...' if len(written) > 4 else ''}")
    layers = []
    for info in infos:
        node = info.node
        alpha = residual.alphas.get(node)
        std = stds[node] * (alpha if alpha is not None else 1.0)
        sig = final.signal(node)
        out = typical(sig.mean_m2, sig.scatter.logvar) * (alpha**2 if alpha is not None else 1.0)
        g_in = final.grad_at(info.input_node) if isinstance(info.input_node, fx.Node) else None
        fan_in, fan_out = info.fans(opts.fan)
        layers.append(
            LayerPlan(
                name=info.name,
                kind=info.geometry.kind,
                weight_shape=info.geometry.weight_shape,
                std=std,
                distribution=distribution,
                fan_in=fan_in,
                fan_out=fan_out,
                eps=info.geometry.eps,
                m_in=info.geometry.m_in,
                m_out=info.geometry.m_out,
                tau_in=info.tau_in,
                gamma=info.gamma,
                clamped=node in clamped,
                residual_scale=alpha,
                pred_out_var=out,
                pred_in_grad_var=typical(g_in.mean_m2, g_in.scatter.logvar) if g_in is not None else 0.0,
                out_spread=math.sqrt(sig.scatter.logvar) / math.log(2),
                grad_spread=math.sqrt(g_in.scatter.logvar) / math.log(2) if g_in is not None else 0.0,
                calls=info.calls,
                bias=m.bias if info.bias is not None else "none",
                weight_path=info.weight_path,
                bias_path=info.bias_path,
                shared=tuple(info.shared),
                other_bias_paths=tuple(info.other_bias_paths),
            )
        )
    for info in infos:
        if info.shared:
            notes.append(f"{info.name} shares its weight with {', '.join(info.shared)}: one std for the weight "
                         f"({info.calls} calls in all), the geometric mean of what each call asks; its first call is described")
        elif info.calls > 1:
            notes.append(f"{info.name} is called {info.calls} times: one std, the geometric mean of what each call "
                         "asks; its first call is described")
    return InitPlan(
        method=m.name,
        options=opts.to_dict(),
        input_shape=shape,
        layers=layers,
        norm_scales=norm_scales,
        residual={"policy": policy, "adds": len(adds), "growth": opts.residual_growth,
                  "scaled": len(residual.alphas)},
        notes=notes,
        modes=modes,
    )
