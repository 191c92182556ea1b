"""``initscope.audit``: a model's own initialization, as it is, checked layer by layer; no weight changed.

The initialization bug users meet most is one that was never applied: a scaled output-projection init
whose parameter-name match never hit, a head left at zero, one layer drawn twice with the same seed.
Nothing in training says so until it trains badly. For every weight layer the audit sets side by side:

* the std its weights have, and the std each known scheme would give it (every registered data-free
  method's plan, the N(0, 0.02) of GPT-2, BERT and timm's ViTs, and each of those divided by √B on the
  B residual branches' last layers, as GPT-2 and nanoGPT scale their output projections): which
  schemes it matches, if any;
* the second moments the plan predicts from the weights it holds (its output's, and the gradient's at
  its input), and the ones measured on a batch;
* flags, each a sentence: the signal dies or explodes there; it matches no scheme its siblings follow
  (siblings: layers whose names differ only in their numbers, and the last layers of the residual
  branches, which a depth-scaled init scales together); it was never initialized (all entries equal,
  all zero where nothing zeroes it on purpose, the same values as another layer).

A std is said to match a scheme when it is within its sampling error (four standard errors of a std
estimated from n entries, :math:`\\sqrt{1/(2n)}` relative) or 5 %, whichever is wider.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from initscope.errors import InitscopeError
from initscope.graph.branches import Ancestry
from initscope.methods.base import METHODS, Layer, Method
from initscope.plan import unwrap_model
from initscope.rules.registry import is_weight_module

# GPT-2, BERT and timm's ViTs draw every linear layer from N(0, 0.02).
FIXED_STDS = {"normal(0.02)": 0.02}
# A second moment this far from 1 (for unit input, unit output gradient) is where the signal dies or
# explodes: 2^±10, a thousandfold.
DIES, EXPLODES = 2.0**-10, 2.0**10
MATCH_FLOOR = 0.05


class _AsIs(Method):
    """The weights the model holds: each layer's std is its weights' root mean square."""

    name = "as-is"
    summary = "the weights the model holds"
    reads_weights = True

    def std(self, layer: Layer, options) -> tuple[float, bool]:
        w = layer.weight.detach().double()
        return float(w.pow(2).mean().sqrt()), False

    def bias_m2(self, layer: Layer) -> float:
        b = getattr(layer, "bias", None)
        return float(b.detach().double().pow(2).mean()) if isinstance(b, torch.Tensor) and b.numel() else 0.0


@dataclass
class AuditLayer:
    """One weight layer as the audit found it (see the module docstring)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    std: float
    mean: float
    matches: list[str] = field(default_factory=list)
    nearest: str = ""
    nearest_ratio: float = math.nan  # std / the nearest scheme's
    pred_out_var: float = math.nan
    pred_in_grad_var: float = math.nan
    meas_out_var: float = math.nan
    meas_in_grad_var: float = math.nan
    branch_end: bool = False
    flags: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"layer": self.name, "kind": self.kind, "shape": "x".join(map(str, self.shape)), "std": self.std,
                "mean": self.mean, "matches": ", ".join(self.matches), "nearest": self.nearest,
                "nearest_ratio": self.nearest_ratio, "pred_out_var": self.pred_out_var,
                "meas_out_var": self.meas_out_var, "pred_in_grad_var": self.pred_in_grad_var,
                "meas_in_grad_var": self.meas_in_grad_var, "branch_end": self.branch_end,
                "flags": "; ".join(self.flags)}


@dataclass
class Audit:
    """The result of :func:`audit`: one :class:`AuditLayer` per weight layer, in the order of the forward pass."""

    layers: list[AuditLayer]
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> AuditLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no weight layer named {name!r}; audited: {', '.join(l.name for l in self.layers)}")

    @property
    def flagged(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.flags]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([layer.row() for layer in self.layers])

    def __repr__(self) -> str:
        return f"Audit({len(self.layers)} weight layers, flagged={self.flagged})"


def audit(model: nn.Module, *, input_shape: Any = None, example_input: torch.Tensor | None = None,
          batch: int = 16, seed: int = 0) -> Audit:
    """Audit the initialization ``model`` holds now (after its own init code, or a checkpoint); no weight changes.

    Args:
        model: the network, as it is.
        input_shape: one sample's shape (no batch dim); the measurement uses i.i.d. N(0, 1) inputs.
        example_input: a real batch instead (measured on it, predicted from its statistics).
        batch: inputs measured when ``input_shape`` is given.
        seed: seeds the Gaussian batch and the probe's loss noise.

    Examples:
        >>> report = initscope.audit(model, input_shape=(3, 64, 64))
        >>> report.flagged, report["blocks.3.attn.proj"].flags
    """
    if (input_shape is None) == (example_input is None):
        raise ValueError("pass exactly one of input_shape=(C, H, W) (one sample, no batch dim) or example_input=<batch>")
    model = unwrap_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if is_weight_module(m) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no weight layer initscope knows (Conv, Linear, or one with a rule)")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    notes: list[str] = []
    layers = {n: _describe(n, m) for n, m in named}
    ends, on_branches, branches = _branch_ends(model, notes)
    for name in ends:
        if name in layers:
            layers[name].branch_end = True
    _match_schemes(model, layers, input_shape, example_input, branches, notes)
    _predict(model, layers, input_shape, example_input, notes)
    _measure(model, layers, input_shape, example_input, batch, seed, notes)
    order = _forward_order(model, layers, input_shape, example_input)
    result = [layers[n] for n in order]
    _flag(result, named, on_branches)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "audit changed the model"  # never: it only reads
    return Audit(result, notes)


# -- what each layer holds ----------------------------------------------------------------------------
def _describe(name: str, module: nn.Module) -> AuditLayer:
    w = module.weight.detach().double()
    return AuditLayer(name, type(module).__name__.lower(), tuple(w.shape), float(w.std()) if w.numel() > 1 else 0.0,
                      float(w.mean()))


def _branch_ends(model: nn.Module, notes: list[str]) -> tuple[set[str], set[str], int]:
    """The last weight layer of every residual branch (``a + b`` whose inputs share an ancestor), every
    weight layer on a branch, by name, and the number of branches.

    Read from the torch.fx graph alone, so that it works on models initscope has no rules for yet.
    """
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # any tracing failure: no residual grouping, said in the notes
        notes.append(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}); residual branches "
                     "not found, branch ends not compared")
        return set(), set(), 0
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    ancestry = Ancestry.of(nodes)

    def weight(n: fx.Node) -> str | None:
        if n.op == "call_module" and is_weight_module(modules.get(str(n.target))):
            return str(n.target)
        return None

    ends, members_all, count = set(), set(), 0
    adds = [n for n in nodes if n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target)
            in ("add", "iadd", "__add__", "add_")]
    for add in adds:
        inputs = [a for a in add.args[:2] if isinstance(a, fx.Node)]
        if len(inputs) != 2:
            continue
        forked = ancestry.sides(*inputs)
        if forked is None:
            continue
        sides = [[weight(n) for n in members if weight(n)] for members in forked[1]]
        for i, side in enumerate(sides):
            other = sides[1 - i]
            # The branch is the side with more weight layers; an identity or projection shortcut has fewer.
            if side and len(side) > len(other):
                ends.add(side[-1])
                members_all.update(side)
                count += 1
    return ends, members_all, count


# -- schemes ------------------------------------------------------------------------------------------
def _scheme_stds(model, input_shape, example_input, notes) -> dict[str, dict[str, float]]:
    """Scheme name -> layer name -> the std the scheme gives that layer."""
    from initscope.api import plan

    out: dict[str, dict[str, float]] = {}
    failed = None
    for name, m in METHODS.items():
        if m.needs_data or m.adjusts or m.reads_weights:
            continue
        try:
            kw = {"input_shape": input_shape} if input_shape is not None else {"example_input": example_input}
            p = plan(model, name, **kw)
        except (InitscopeError, ValueError, TypeError, RuntimeError) as exc:
            failed = failed or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            continue
        out[name] = {layer.name: layer.std for layer in p.layers}
    if failed and not out:
        notes.append(f"the model does not plan ({failed}); the registered methods' stds are not compared")
    return out


def _tolerance(n: int) -> float:
    return max(MATCH_FLOOR, 4.0 / math.sqrt(2.0 * max(n, 1)))


def _match_schemes(model, layers: dict[str, AuditLayer], input_shape, example_input, branches: int, notes) -> None:
    schemes = _scheme_stds(model, input_shape, example_input, notes)
    for name, layer in layers.items():
        candidates = {s: stds[name] for s, stds in schemes.items() if name in stds}
        candidates.update(FIXED_STDS)
        if layer.branch_end and branches > 1:
            # GPT-2 and nanoGPT divide the residual branches' last layers by sqrt(number of branches).
            for s, std in list(candidates.items()):
                candidates[f"{s}/sqrt({branches})"] = std / math.sqrt(branches)
        n = math.prod(layer.shape)
        tol = _tolerance(n)
        scored = [(abs(math.log(layer.std / std)), s, layer.std / std) for s, std in candidates.items()
                  if std > 0 and layer.std > 0]
        layer.matches = [s for d, s, _ in sorted(scored) if d <= math.log1p(tol)]
        if scored:
            _, layer.nearest, layer.nearest_ratio = min(scored)


# -- predictions and measurements -----------------------------------------------------------------------
def _predict(model, layers, input_shape, example_input, notes) -> None:
    from initscope.planner import build_plan
    from initscope.options import Options

    try:
        p = build_plan(model, _AsIs(), input_shape, example_input, Options(residual="none"), cache=False)
    except (InitscopeError, ValueError, TypeError, RuntimeError) as exc:
        notes.append(f"no predictions: the model does not plan ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return
    for lp in p.layers:
        if lp.name in layers:
            layers[lp.name].pred_out_var = lp.pred_out_var
            layers[lp.name].pred_in_grad_var = lp.pred_in_grad_var


def _batch(input_shape, example_input, batch: int, seed: int) -> torch.Tensor:
    if example_input is not None:
        return example_input
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))


def _measure(model, layers, input_shape, example_input, batch, seed, notes) -> None:
    from initscope.probe import probe

    try:
        p = probe(model, _batch(input_shape, example_input, batch, seed), plan=None, layers=list(layers), seed=seed,
                  quantities=("output", "input_grad"), quantiles=False, histograms=False)
    except InitscopeError as exc:
        notes.append(f"not measured: {exc}")
        return
    for ls in p.layers:
        layers[ls.name].meas_out_var = ls.meas_out_var
        layers[ls.name].meas_in_grad_var = ls.meas_in_grad_var


def _forward_order(model, layers, input_shape, example_input) -> list[str]:
    """Layer names in the order the forward pass calls them (those never called last)."""
    seen: list[str] = []
    modules = {n: model.get_submodule(n) for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append(n) if n not in seen else None)
             for n, m in modules.items()]
    try:
        with torch.no_grad():
            x = _batch(input_shape, example_input, 2, 0)
            training = model.training
            model.eval()  # no running statistics touched
            try:
                model(x)
            finally:
                model.train(training)
    except Exception:  # the probe already said why the model does not run
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in layers if n not in seen]


# -- flags --------------------------------------------------------------------------------------------
def _template(name: str) -> str:
    return re.sub(r"\d+", "*", name)


def _depth_split(ends: list[AuditLayer]) -> tuple[str, list[AuditLayer]] | None:
    """``(S/sqrt(B), the ends that follow S)`` when the residual branches' last layers follow no one
    scheme together but split between a scheme S and its depth-scaled S/sqrt(B); else None."""
    if len(ends) < 2 or set.intersection(*(set(m.matches) for m in ends)):
        return None
    for m in ends:
        for scaled in (s for s in m.matches if "/sqrt(" in s):
            base = scaled.split("/sqrt(")[0]
            with_base = [e for e in ends if base in e.matches and scaled not in e.matches]
            with_scaled = [e for e in ends if scaled in e.matches]
            if with_base and len(with_base) + len(with_scaled) == len(ends):
                return scaled, with_base
    return None


def _flag(result: list[AuditLayer], named: list[tuple[str, nn.Module]], on_branches: set[str]) -> None:
    modules = dict(named)
    last = result[-1].name if result else None
    # Never initialized: all equal, all zero where nothing zeroes on purpose, a copy of another layer.
    digests: dict[tuple, list[str]] = defaultdict(list)
    for layer in result:
        w = modules[layer.name].weight.detach()
        if w.numel() > 1 and bool((w == w.reshape(-1)[0]).all()):
            if float(w.reshape(-1)[0]) == 0.0:
                if not (layer.branch_end or layer.name == last):
                    layer.flags.append("all zero, and nothing zeroes this layer on purpose (it is not a residual "
                                       "branch's last layer nor the classifier): never initialized?")
            else:
                layer.flags.append(f"every entry is {float(w.reshape(-1)[0]):.4g}: never initialized")
            continue
        data = w.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        digests[(tuple(w.shape), str(w.dtype), hashlib.blake2b(data, digest_size=16).digest())].append(layer.name)
    by_name = {l.name: l for l in result}
    for names in digests.values():
        if len(names) > 1:
            for n in names:
                others = ", ".join(o for o in names if o != n)
                by_name[n].flags.append(f"the same values as {others}: drawn twice from one seed, or copied")
    # Dies or explodes, on the path the signal takes: a residual branch may be small on purpose (its
    # block then passes the signal on through the shortcut), so layers on branches are not judged.
    for layer in result:
        if layer.name in on_branches:
            continue
        for what, value in (("output", layer.meas_out_var if layer.meas_out_var == layer.meas_out_var else layer.pred_out_var),
                            ("input gradient", layer.meas_in_grad_var if layer.meas_in_grad_var == layer.meas_in_grad_var
                             else layer.pred_in_grad_var)):
            if value == value and value > 0 and not (DIES <= value <= EXPLODES):
                verb = "dies" if value < DIES else "explodes"
                layer.flags.append(f"the {'signal' if what == 'output' else 'gradient'} {verb}: E[{'u²' if what == 'output' else '(∂L/∂x)²'}] "
                                   f"= 2^{math.log2(value):+.1f} for unit {'input' if what == 'output' else 'output gradient'}")
    # Odd ones out among siblings.
    groups: dict[str, list[AuditLayer]] = defaultdict(list)
    for layer in result:
        groups[f"name {_template(layer.name)}"].append(layer)
        if layer.branch_end:
            groups["the residual branches' last layers"].append(layer)
    ends_group = groups.get("the residual branches' last layers", [])
    depth_scaled = _depth_split(ends_group)
    if depth_scaled is not None:
        scaled_scheme, unscaled = depth_scaled
        for m in unscaled:
            if not any("never initialized" in f or "drawn twice" in f for f in m.flags):
                m.flags.append(f"{len(ends_group) - len(unscaled)} of the {len(ends_group)} residual branches' last "
                               f"layers are scaled for depth ({scaled_scheme}), this one is not (its std {m.std:.4g}, "
                               f"{m.nearest_ratio:.3g}x {m.nearest}): a depth-scaled init meant for it never applied?")
    for label, members in groups.items():
        if len(members) < 3 or len({m.name for m in members}) < 3:
            continue
        if label == "the residual branches' last layers" and depth_scaled is not None:
            continue
        counts = Counter(s for m in members for s in m.matches)
        if not counts:
            continue
        scheme, n = counts.most_common(1)[0]
        if n < max(2, (len(members) + 1) // 2):
            continue
        for m in members:
            if scheme not in m.matches and not any("never initialized" in f or "drawn twice" in f for f in m.flags):
                m.flags.append(f"matches no scheme its siblings ({label}: {n} of {len(members)}) follow, {scheme}; "
                               f"its std is {m.std:.4g}, {m.nearest_ratio:.3g}x {m.nearest or 'any scheme'}")
