"""The hook machinery of the probe: which layers to watch, and the hooks that take their statistics.

Statistics are taken the moment a tensor exists and the tensor is not kept: a layer's output in its
module's forward hook (so before an in-place activation overwrites it), gradients in tensor hooks
(``Tensor.register_hook``) on the layer's input and output. Tensor hooks, unlike full backward hooks on
modules, work when the next op is in place (``nn.ReLU(inplace=True)``, torchvision's
``out += identity``): a hook registered before an in-place op receives the gradient of the value the
tensor held before it. Residual adds have no module; with ``layers="all"`` the model is traced with
torch.fx and run through an :class:`torch.fx.Interpreter` that taps every tensor ``add`` node.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from initscope.probe.summary import DEFAULT_BINS, DEFAULT_SAMPLE, Stats, summarize
from initscope.rules.registry import is_weight_module

QUANTITIES: tuple[str, ...] = ("weight", "output", "activation", "output_grad", "input_grad", "weight_grad")

# Weight layers are what the rule registry says they are (initscope.rules.registry.is_weight_module);
# these are the other modules worth watching.
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
)
POOLING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
NORMS = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
    nn.LocalResponseNorm,
)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclass
class LayerRecord:
    """What the hooks collected for one layer (a module, or an ``add`` node of the traced graph)."""

    name: str
    kind: str
    module: nn.Module | None
    index: int = -1
    calls: int = 0
    exited: bool = False
    stats: dict[str, Stats] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """The layers a probe watches: module names, and (when traced) the graph and its add nodes to tap."""

    modules: list[str]
    graph: fx.Graph | None = None
    adds: dict[str, str] = field(default_factory=dict)  # fx node name -> layer name


def _kind(module: nn.Module) -> str:
    return type(module).__name__.lower()


def _is_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add:
        return False
    # A residual add joins two computed values; x + 1 or a sum of sizes is not one.
    return len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def trace_adds(model: nn.Module) -> tuple[fx.Graph, dict[str, str]]:
    """Trace ``model`` with torch.fx (torch.nn modules as leaves); name every two-operand add node.

    An add is named for the innermost module whose forward contains it: ``layer1.0.add`` for the
    residual add of torchvision's ``layer1[0]`` (``add_1``, ``add_2``... when a forward has several).
    """
    graph = fx.Tracer().trace(model)
    adds: dict[str, str] = {}
    taken: set[str] = set()
    for node in graph.nodes:
        if not _is_add(node):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        scope = ""
        if stack:
            last_key, last_val = list(stack.items())[-1]
            scope = last_val[0] if isinstance(last_val, tuple) else str(last_key)
        base = f"{scope}.add" if scope else "add"
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        adds[node.name] = name
    return graph, adds


def candidates(model: nn.Module) -> list[str]:
    """Names of the modules a probe can watch (weight layers, activations, pooling, norms)."""
    kinds = ACTIVATIONS + POOLING + NORMS
    return [n for n, m in model.named_modules() if is_weight_module(m) or isinstance(m, kinds)]


def select(model: nn.Module, layers: str | Sequence[str]) -> Selection:
    """Resolve ``layers`` (``"weighted"``, ``"all"`` or a list of names) to a :class:`Selection`.

    ``"weighted"``: every Conv1d/2d/3d and Linear. ``"all"``: those, activations, pooling, norms and
    every residual add torch.fx can reach (a model fx cannot trace is probed without its adds, with a
    warning). A list names modules (as in ``model.named_modules()``) or adds (as :func:`trace_adds` names
    them); an unknown name raises ``ValueError`` listing the valid ones.
    """
    named = dict(model.named_modules())
    if isinstance(layers, str):
        if layers == "weighted":
            return Selection([n for n, m in named.items() if is_weight_module(m)])
        if layers == "all":
            mods = candidates(model)
            try:
                graph, adds = trace_adds(model)
            except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
                warnings.warn(
                    f"layers='all': residual adds are not probed because torch.fx cannot trace "
                    f"{type(model).__name__} ({type(exc).__name__}: {exc}); modules are probed as usual",
                    stacklevel=3,
                )
                return Selection(mods)
            return Selection(mods, graph if adds else None, adds)
        raise ValueError(f"layers must be 'weighted', 'all' or a list of layer names, got {layers!r}")
    wanted = list(layers)
    if not wanted or not all(isinstance(n, str) for n in wanted):
        raise ValueError(f"layers must be 'weighted', 'all' or a non-empty list of layer names, got {layers!r}")
    mods = [n for n in wanted if n in named]
    rest = [n for n in wanted if n not in named]
    graph, adds = None, {}
    if rest:
        try:
            graph, all_adds = trace_adds(model)
        except Exception:
            graph, all_adds = None, {}
        by_name = {v: k for k, v in all_adds.items()}
        unknown = [n for n in rest if n not in by_name]
        if unknown:
            valid = candidates(model) + sorted(by_name)
            raise ValueError(
                f"unknown layer name(s) {unknown}: valid names are modules of the model, e.g. "
                f"{', '.join(valid)}"
            )
        adds = {by_name[n]: n for n in rest}
    return Selection(mods, graph if adds else None, adds)


def check_quantities(quantities: Sequence[str]) -> None:
    """Refuse names that are not among :data:`QUANTITIES`, listing the valid ones."""
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad:
        raise ValueError(f"unknown quantities {bad}: choose from {', '.join(QUANTITIES)}")


class Recorder:
    """Hooks that take statistics of the selected layers during one forward and backward pass.

    :meth:`install` registers module hooks (removed by :meth:`remove`); tensor hooks are registered on
    the pass's own tensors and go with them. Every layer is described at its first call.
    """

    def __init__(self, model: nn.Module, selection: Selection, *, quantities: Sequence[str] = QUANTITIES,
                 bins: int = DEFAULT_BINS, quantiles: bool = True, histograms: bool = True,
                 sample: int = DEFAULT_SAMPLE, seed: int = 0) -> None:
        check_quantities(quantities)
        self.model = model
        self.selection = selection
        self.quantities = frozenset(quantities)
        self._summary_kw = dict(bins=bins, quantiles=quantiles, histograms=histograms, sample=sample)
        self._rng = np.random.default_rng(seed)
        named = dict(model.named_modules())
        self.records: dict[str, LayerRecord] = {n: LayerRecord(n, _kind(named[n]), named[n]) for n in selection.modules}
        for layer in selection.adds.values():
            self.records[layer] = LayerRecord(layer, "add", None)
        self._by_module = {id(r.module): r for r in self.records.values() if r.module is not None}
        self._handles: list = []
        self._producers: dict[int, tuple[weakref.ref, int, list[LayerRecord]]] = {}
        self._pending: dict[int, list[LayerRecord]] = {}
        self._cache: dict[int, tuple[weakref.ref, int, Stats]] = {}
        self.stack: list[tuple[str, nn.Module | None, tuple[int, ...] | None]] = []
        self._next_index = 0
        self.active = False

    # -- statistics --------------------------------------------------------------------------------
    def summarize(self, t: torch.Tensor) -> Stats:
        """Statistics of ``t``, once per tensor and version: a tensor can be one layer's output and the
        next one's input, or the gradient handed to two hooks (a block input feeding a conv and a shortcut)."""
        key = id(t)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        stats = summarize(t, rng=self._rng, **self._summary_kw)
        self._cache[key] = (weakref.ref(t), t._version, stats)
        return stats

    def _grad_hook(self, rec: LayerRecord, quantity: str):
        def hook(grad: torch.Tensor) -> None:
            if self.active and quantity not in rec.stats:
                rec.stats[quantity] = self.summarize(grad)
        return hook

    # -- a layer's call, shared by module hooks and the traced graph's add nodes -------------------------
    def enter(self, rec: LayerRecord, x) -> None:
        rec.calls += 1
        if rec.calls > 1:
            return
        rec.index = self._next_index
        self._next_index += 1
        if "input_grad" in self.quantities and isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(self._grad_hook(rec, "input_grad"))

    def exit(self, rec: LayerRecord, out) -> None:
        if rec.exited or rec.calls != 1 or not isinstance(out, torch.Tensor):
            return
        rec.exited = True
        if "output" in self.quantities:
            rec.stats["output"] = self.summarize(out)
        if "output_grad" in self.quantities and out.requires_grad:
            out.register_hook(self._grad_hook(rec, "output_grad"))
        if "activation" in self.quantities:
            self._produce(out, [rec])

    def _produce(self, out: torch.Tensor, recs: list[LayerRecord]) -> None:
        """Remember that the activation applied to ``out`` is that of ``recs``' layers.

        Weak, with the version counter: the tensor is not kept alive, and one changed in place since
        (out += identity) is no longer these layers' output.
        """
        known = self._producer_of(out)
        self._producers[id(out)] = (weakref.ref(out), out._version, known + [r for r in recs if r not in known])

    def _producer_of(self, x) -> list[LayerRecord]:
        if not isinstance(x, torch.Tensor):
            return []
        found = self._producers.get(id(x))
        if found is None:
            return []
        ref, version, recs = found
        if ref() is not x or x._version != version:
            return []
        return recs

    # -- module hooks --------------------------------------------------------------------------------
    def _pre(self, name: str, module: nn.Module):
        rec = self._by_module.get(id(module))
        is_act = isinstance(module, ACTIVATIONS)

        def hook(mod, args):
            x = args[0] if args else None
            self.stack.append((name, mod, tuple(x.shape) if isinstance(x, torch.Tensor) else None))
            if is_act:
                self._pending[id(mod)] = list(self._producer_of(x))
            if rec is not None:
                self.enter(rec, x)
        return hook

    def _post(self, module: nn.Module):
        rec = self._by_module.get(id(module))
        is_act = isinstance(module, ACTIVATIONS)
        is_norm = isinstance(module, NORMS)

        def hook(mod, args, out):
            if rec is not None:
                self.exit(rec, out)
            if is_norm and "activation" in self.quantities and isinstance(out, torch.Tensor):
                # Conv -> BatchNorm -> ReLU: the conv's activation is the ReLU after its norm (the
                # second paper's figures), so a norm hands its input's layers on to its output.
                upstream = [r for r in self._producer_of(args[0] if args else None) if "activation" not in r.stats]
                if upstream:
                    self._produce(out, upstream)
            if is_act:
                producers = self._pending.pop(id(mod), [])
                if isinstance(out, torch.Tensor):
                    for producer in producers:
                        if "activation" not in producer.stats:
                            producer.stats["activation"] = self.summarize(out)
            if self.stack:
                self.stack.pop()
        return hook

    def install(self) -> None:
        """Register the module hooks; every module gets a pair (the error context needs the call stack)."""
        self.active = True
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name, module)))
            self._handles.append(module.register_forward_hook(self._post(module)))

    def remove(self) -> None:
        """Remove every module hook; tensor hooks left on the pass's tensors become no-ops."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._producers.clear()
        self._pending.clear()
        self._cache.clear()
        self.active = False

    # -- running -----------------------------------------------------------------------------------
    def run(self, x: torch.Tensor):
        """The forward pass: the model itself, or its traced graph when adds are tapped."""
        if self.selection.graph is None:
            return self.model(x)
        return _TapInterpreter(self, self.selection.graph).run(x)

    def take_weights(self) -> dict[str, torch.Tensor]:
        """Statistics of each called layer's weight; returns the weights whose gradient is wanted."""
        wanted = {}
        for rec in self.records.values():
            w = getattr(rec.module, "weight", None) if rec.module is not None else None
            if rec.index < 0 or not isinstance(w, torch.Tensor):
                continue
            if "weight" in self.quantities:
                rec.stats["weight"] = self.summarize(w)
            if "weight_grad" in self.quantities and w.requires_grad:
                wanted[rec.name] = w
        return wanted

    def take_weight_grads(self, grads: dict[str, torch.Tensor | None]) -> None:
        for name, g in grads.items():
            if g is not None:
                self.records[name].stats["weight_grad"] = self.summarize(g)

    def called(self) -> list[LayerRecord]:
        """The records of the layers that ran, in the order of their first call."""
        return sorted((r for r in self.records.values() if r.index >= 0), key=lambda r: r.index)

    def uncalled(self) -> list[str]:
        return [r.name for r in self.records.values() if r.index < 0]


class _TapInterpreter(fx.Interpreter):
    """Runs the traced graph on the model's own modules (so their hooks fire) and taps the add nodes."""

    def __init__(self, recorder: Recorder, graph: fx.Graph) -> None:
        super().__init__(recorder.model, garbage_collect_values=True, graph=graph)
        self.recorder = recorder
        self.taps = {node: recorder.records[layer] for node, layer in recorder.selection.adds.items()}

    def run_node(self, n: fx.Node):
        rec = self.taps.get(n.name)
        if rec is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor):
            return super().run_node(n)
        self.recorder.stack.append((rec.name, None, tuple(first.shape)))
        self.recorder.enter(rec, first)
        out = super().run_node(n)
        self.recorder.exit(rec, out)
        self.recorder.stack.pop()
        return out
