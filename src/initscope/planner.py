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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from initscope import plan_cache
from initscope.errors import InitscopeError
from initscope.graph.propagate import Pass, Resolved, WeightHook
from initscope.graph.trace import trace
from initscope.methods import Method, asv, classic, get_method, layer_std
from initscope.methods.residual import ResidualPolicy, find_residual_adds
from initscope.options import Options
from initscope.plan import InitPlan, LayerPlan
from initscope.rules.base import LayerGeometry, WeightRule
from initscope.stats.dist import DTYPE, Dist
from initscope.stats.fluctuation import typical
from initscope.stats.signal import Signal
from initscope.threads import one_intra_op_thread

EXACT_ROUNDS = 3


@dataclass
class LayerInfo:
    """A weight layer as the planner sees it."""

    name: str
    node: fx.Node
    input_node: fx.Node
    geometry: LayerGeometry
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_path: str
    bias_path: str | None
    tau_in: float
    gamma: float
    calls: int = 1


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
    return Signal(shape, m2, cov=cov, rho=rho, xcorr=xcorr, dist=dist)


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


# -- weight hooks ----------------------------------------------------------------------------------
class _Unit(WeightHook):
    def forward(self, node, ctx, unit):
        return 1.0, 0.0

    def backward(self, node, ctx, unit, arrived):
        return 1.0


class FixedStds(WeightHook):
    def __init__(self, stds: dict[fx.Node, float], bias_m2: dict[fx.Node, float]) -> None:
        self.stds, self.bias_m2 = stds, bias_m2

    def forward(self, node, ctx, unit):
        return self.stds[node] ** 2, self.bias_m2.get(node, 0.0)

    def backward(self, node, ctx, unit, arrived):
        return self.stds[node] ** 2


class ExactForward(FixedStds):
    """Chooses each std so that the layer's predicted output second moment is 1."""

    def __init__(self, infos: dict[fx.Node, LayerInfo], ratio: float | None) -> None:
        super().__init__({}, {})
        self.infos, self.ratio = infos, ratio
        self.clamped: set[fx.Node] = set()

    def forward(self, node, ctx, unit):
        if node not in self.stds:
            info = self.infos[node]
            a = typical(unit.mean_m2, unit.logvar)
            std = math.sqrt(1.0 / a) if a > 0 else math.inf
            std, bit = asv.clamp(std, info.geometry, "forward", self.ratio)
            if not math.isfinite(std):
                raise InitscopeError(f"layer {info.name!r} receives no signal; asv-forward-exact is undefined there")
            self.stds[node] = std
            if bit:
                self.clamped.add(node)
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
        a = typical(unit.mean_m2, unit.logvar)
        if a <= 0:
            self.silent.add(node)
            std = self.stds[node]
        else:
            std, bit = asv.clamp(math.sqrt(target / a), info.geometry, "backward", self.ratio)
            if bit:
                self.clamped.add(node)
        self.decided[node] = std
        return std**2


# -- planning --------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"module {name or type(model).__name__!r} ({type(module).__name__}) has a parameter {pname!r} "
                    "that is not materialized yet (a lazy module): run one forward pass on an example batch first"
                )


def _layer_infos(resolved: Resolved, local: Pass) -> list[LayerInfo]:
    infos: dict[str, LayerInfo] = {}
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
        if name in infos:
            infos[name].calls += 1
            continue
        x = rule.input_signal(ctx)
        g = local.grad_at(node)
        input_node = node.args[0] if node.args else node.kwargs.get("input")
        infos[name] = LayerInfo(
            name=name,
            node=node,
            input_node=input_node,
            geometry=rule.geometry(ctx, *ctx.args, **ctx.kwargs),
            weight=weight,
            bias=bias,
            weight_path=weight_path,
            bias_path=bias_path,
            tau_in=x.mean_m2,
            gamma=g.mean_m2 if g is not None else 0.0,
        )
    return list(infos.values())


def _mark_norm_knobs(resolved: Resolved, adds: list) -> bool:
    """Mark the normalizations that scale a residual branch; True if any holds other than γ = 1, β = 0."""
    changed = False
    for ra in adds:
        for b in ra.branches:
            if b.knob_kind != "norm":
                continue
            b.knob.meta["initscope_knob"] = True
            module = resolved.modules.get(b.knob)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            with torch.no_grad():
                if weight is not None and not bool((weight == 1).all()):
                    changed = True
                if bias is not None and not bool((bias == 0).all()):
                    changed = True
    return changed


def _paper_model(resolved: Resolved, inputs: list[Signal], opts: Options, shape: Any) -> Pass:
    """The paper's model (every weight layer's output reset to i.i.d. N(0, 1)), forward and backward."""
    try:
        return Pass(resolved, inputs, _Unit(), local=True, plane=True, on_unknown=opts.on_unknown).forward().backward()
    except InitscopeError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise ValueError(f"the model does not run on input_shape={shape!r}: {exc}") from exc


def _run(resolved, inputs, hook, opts: Options, residual: ResidualPolicy | None) -> Pass:
    return Pass(resolved, inputs, hook, max_cov=opts.max_cov_positions, on_unknown=opts.on_unknown,
                residual=residual).forward().backward()


def planned_distribution(m: Method, opts: Options) -> str:
    """The law every layer of the plan is drawn from."""
    if m.name == "orthogonal":
        return "orthogonal"
    return opts.distribution or m.distribution or "orthogonal"


def build_plan(
    model: nn.Module,
    method: str,
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
    m: Method = get_method(method)
    if opts.distribution is not None and m.distribution in (None, "uniform") and m.name in ("orthogonal", "default"):
        raise ValueError(
            f"method {m.name!r} draws its own way ({'orthogonal matrices' if m.name == 'orthogonal' else 'the modules’ own rule'}); "
            "leave distribution=None"
        )
    _check_model(model)
    full_inputs, local_inputs, shape = make_inputs(input_shape, example_input, opts.max_cov_positions)
    resolved = Resolved.of(trace(model))
    key = plan_cache.plan_key(resolved, m.name, opts.to_dict(), shape) if cache and example_input is None else None
    remembered = plan_cache.lookup(key)
    if remembered is not None:
        return remembered
    if on_propagate is not None:
        on_propagate()
    with one_intra_op_thread():
        result = _propagate(model, m, resolved, full_inputs, local_inputs, shape, opts)
    plan_cache.store(key, result)
    return result


def _propagate(model: nn.Module, m: Method, resolved: Resolved, full_inputs: Any, local_inputs: Any,
               shape: Any, opts: Options) -> InitPlan:
    """The plan, computed: the paper's model, the stds, then the full propagation."""
    policy = opts.residual or m.residual
    # The paper's model: τ and γ of every layer.
    local = _paper_model(resolved, local_inputs, opts, shape)
    adds = find_residual_adds(resolved, local)
    if policy != "none" and _mark_norm_knobs(resolved, adds):
        # Some knob holds a weight or bias the plan will overwrite: plan the paper's model again as
        # it will be after applying, so that planning twice gives the same plan.
        local = _paper_model(resolved, local_inputs, opts, shape)
    infos = _layer_infos(resolved, local)
    if not infos:
        raise ValueError(
            f"{type(model).__name__} has no Conv1d/2d/3d or Linear layer reached by its forward pass: nothing to initialize"
        )
    by_node = {i.node: i for i in infos}

    # Stds from formulas (the exact variants start from the paper's).
    stds, clamped = {}, set()
    for info in infos:
        std, bit = layer_std(m, info, opts.max_std_ratio, opts.fan)
        if not math.isfinite(std):
            raise ValueError(
                f"layer {info.name!r} gets no {'signal' if m.direction == 'forward' else 'gradient'} in the paper's model "
                f"({'tau' if m.direction == 'forward' else 'gamma'} = 0): {m.name} is undefined there; "
                "keep the clamp (max_std_ratio) on"
            )
        stds[info.node] = std
        if bit:
            clamped.add(info.node)
    bias_m2 = {}
    if m.name == "default":
        for info in infos:
            if info.bias is not None:
                bias_m2[info.node] = classic.default_bias_bound(info.weight) ** 2 / 3.0

    # The full propagation, choosing stds where the method does.
    residual = ResidualPolicy(adds, policy, opts.residual_growth, backward_starts=m.exact and m.direction == "backward")
    notes: list[str] = []
    try:
        if m.exact and m.direction == "forward":
            hook = ExactForward(by_node, opts.max_std_ratio)
            final = _run(resolved, full_inputs, hook, opts, residual)
            stds, clamped = hook.stds, hook.clamped
        elif m.exact:
            starts = {}
            if policy == "scale":
                for ra in adds:
                    for b in ra.branches:
                        if b.knob_kind == "weight":
                            for s in b.starts:
                                starts[s] = len(b.starts)
            provisional = dict(stds)
            for _ in range(EXACT_ROUNDS):
                residual = ResidualPolicy(adds, policy, opts.residual_growth, backward_starts=True)
                hook = ExactBackward(by_node, provisional, opts.max_std_ratio, starts, residual.beta)
                _run(resolved, full_inputs, hook, opts, residual)
                change = max(abs(hook.decided[n] / provisional[n] - 1) for n in hook.decided) if hook.decided else 0.0
                provisional.update(hook.decided)
                if change < 1e-4:
                    break
            stds, clamped = provisional, hook.clamped
            for info in infos:
                if info.node in hook.silent:
                    notes.append(f"{info.name}: no gradient reaches it; kept the paper's std")
            residual = ResidualPolicy(adds, policy, opts.residual_growth, decide=False, alphas=residual.alphas,
                                      backward_starts=True)
            final = _run(resolved, full_inputs, FixedStds(stds, bias_m2), opts, residual)
        else:
            final = _run(resolved, full_inputs, FixedStds(stds, bias_m2), opts, residual)
    except InitscopeError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise ValueError(f"the model does not run on input_shape={shape!r}: {exc}") from exc
    notes += [f"residual policy not applied at {s}" for s in residual.skipped]

    distribution = planned_distribution(m, opts)
    layers = []
    norm_scales = {}
    for node, alpha in residual.alphas.items():
        if node not in by_node:
            norm_scales[str(node.target)] = alpha
    for info in infos:
        node = info.node
        alpha = residual.alphas.get(node)
        std = stds[node] * (alpha if alpha is not None else 1.0)
        sig = final.signal(node)
        out = typical(sig.mean_m2, sig.logvar) * (alpha**2 if alpha is not None else 1.0)
        g_in = final.grad_at(info.input_node) if isinstance(info.input_node, fx.Node) else None
        fan_in, fan_out = classic.fans(info.geometry, info.weight, opts.fan)
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
                pred_in_grad_var=typical(g_in.mean_m2, g_in.logvar) if g_in is not None else 0.0,
                out_spread=math.sqrt(sig.logvar) / math.log(2),
                grad_spread=math.sqrt(g_in.logvar) / math.log(2) if g_in is not None else 0.0,
                calls=info.calls,
                bias=("default" if m.name == "default" else "zero") if info.bias is not None else "none",
                weight_path=info.weight_path,
                bias_path=info.bias_path,
            )
        )
    for info in infos:
        if info.calls > 1:
            notes.append(f"{info.name} is called {info.calls} times; its first call is described")
    result = InitPlan(
        method=m.name,
        options=opts.to_dict(),
        input_shape=shape,
        layers=layers,
        norm_scales=norm_scales,
        residual={"policy": policy, "adds": len(adds), "growth": opts.residual_growth,
                  "scaled": len(residual.alphas)},
        notes=notes,
    )
    return result
