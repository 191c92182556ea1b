"""Plans remembered by architecture: planning a network seen before costs a trace, not a propagation.

A plan is a pure function of what the propagation reads: the traced graph, every module's
hyperparameters, the values of the parameters and buffers the rules read (normalization weights,
PReLU slopes, constants in the graph), the method, the options and the input shape. It never reads
the values of the weights it draws. A sweep builds the same network for every run, and re-initializing
a model for another seed plans it again; both find their plan here.

The key holds all of the above, compared exactly (tensors by a digest of their bytes). Anything the key
cannot capture makes a graph uncacheable rather than risk a stale plan: a rule registered outside
initscope (it may read any attribute), an op with no rule, an ``example_input`` (its statistics are
data), an argument of an unknown type. Registering or removing a rule or a method empties the cache.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from initscope.graph.propagate import Resolved
from initscope.methods.base import METHODS, Method
from initscope.plan import InitPlan
from initscope.rules import registry
from initscope.rules.base import WeightRule

MAX_PLANS = 64


class _Uncacheable(Exception):
    pass


@dataclass
class CacheInfo:
    hits: int
    misses: int
    uncacheable: int
    size: int


_lock = threading.Lock()
_plans: "OrderedDict[tuple, InitPlan]" = OrderedDict()
_counts = {"hits": 0, "misses": 0, "uncacheable": 0}
_registry_version: tuple = ()


def cache_info() -> CacheInfo:
    """How often :func:`initscope.plan` found its plan here, and how many plans are kept."""
    with _lock:
        return CacheInfo(_counts["hits"], _counts["misses"], _counts["uncacheable"], len(_plans))


def clear_plan_cache() -> None:
    """Forget every remembered plan (and the counts)."""
    with _lock:
        _plans.clear()
        for k in _counts:
            _counts[k] = 0


def _digest(t: torch.Tensor) -> tuple:
    try:
        data = t.detach().reshape(-1).to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # meta tensors, exotic layouts
        raise _Uncacheable(str(exc)) from exc
    return ("tensor", tuple(t.shape), str(t.dtype), hashlib.blake2b(data, digest_size=16).digest())


def _value(v: Any) -> Any:
    """A hashable stand-in for a hyperparameter or a node argument, equal exactly when the value is."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, Number):
        return (type(v).__name__, v)
    if isinstance(v, fx.Node):
        return ("node", v.name)
    if isinstance(v, torch.Tensor):
        return _digest(v)
    if isinstance(v, (tuple, list, torch.Size)):
        return (type(v).__name__, tuple(_value(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted(((str(k), _value(x)) for k, x in v.items()), key=lambda kv: kv[0])))
    if isinstance(v, slice):
        return ("slice", _value(v.start), _value(v.stop), _value(v.step))
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (type(v).__name__, str(v))
    if v is Ellipsis:
        return "..."
    raise _Uncacheable(f"an argument of type {type(v).__name__}")


def _module(m: nn.Module, weight_layer: bool) -> tuple:
    attrs = tuple(sorted((k, _value(v)) for k, v in vars(m).items() if not k.startswith("_")))
    tensors = []
    for name, p in m.named_parameters(recurse=False):
        # The drawn weights' values never enter a plan; only their shapes do.
        tensors.append((name, ("shape", tuple(p.shape), str(p.dtype)) if weight_layer else _digest(p)))
    for name, b in m.named_buffers(recurse=False):
        tensors.append((name, _digest(b)))
    return (type(m), attrs, tuple(tensors))


def _graph(resolved: Resolved) -> tuple:
    entries = []
    # Which module first holds each parameter: two modules sharing one Parameter are planned as one
    # weight, which the key must tell from two modules with weights of the same shapes.
    holder: dict[int, str] = {}
    for node in resolved.traced.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            rule = resolved.rules.get(node)
            if rule is None:
                raise _Uncacheable(f"no rule for {node.name}")
            if not type(rule).__module__.startswith("initscope."):
                raise _Uncacheable(f"{node.name} has a rule registered outside initscope")
        if node.op == "call_module":
            module = resolved.modules[node]
            shares = tuple(holder.setdefault(id(p), f"{node.target}.{n}") for n, p in module.named_parameters(recurse=False))
            target = (node.target, _module(module, isinstance(resolved.rules[node], WeightRule)), shares)
        elif node.op == "get_attr":
            target = (node.target, _value(node.meta.get("initscope_param")))
        elif node.op == "call_function":
            target = node.target  # the function object itself: hashable, compared by identity
        else:
            target = node.target
        # The mode a node runs in decides what a dropout does (the graph is traced in eval mode).
        entries.append((node.op, node.name, target, _value(node.args), _value(node.kwargs),
                        node.meta.get("initscope_training")))
    return tuple(entries)


def plan_key(resolved: Resolved, method: Method, options: dict, inputs: Any) -> tuple | None:
    """The cache key of a plan, or None when the graph holds something a key cannot capture.

    The method enters as its registered object: a method registered again under its name (with
    ``overwrite=True``) is another method, and its plans are others.
    """
    try:
        return ((method.name, id(method)), _value(options), _value(inputs), _graph(resolved))
    except _Uncacheable:
        with _lock:
            _counts["uncacheable"] += 1
        return None


def _check_registry() -> None:
    global _registry_version
    version = (registry.version(), METHODS.version)
    if version != _registry_version:
        _plans.clear()
        _registry_version = version


def _copy(p: InitPlan) -> InitPlan:
    # LayerPlans are frozen; the containers are the caller's to change.
    return InitPlan(p.method, copy.deepcopy(p.options), p.input_shape, list(p.layers), dict(p.norm_scales),
                    copy.deepcopy(p.residual), list(p.notes), modes=dict(p.modes))


def lookup(key: tuple | None) -> InitPlan | None:
    if key is None:
        return None
    with _lock:
        _check_registry()
        found = _plans.get(key)
        if found is None:
            _counts["misses"] += 1
            return None
        _plans.move_to_end(key)
        _counts["hits"] += 1
        return _copy(found)


def store(key: tuple | None, p: InitPlan) -> None:
    if key is None:
        return
    with _lock:
        _check_registry()
        _plans[key] = _copy(p)
        _plans.move_to_end(key)
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
