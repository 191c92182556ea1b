"""initscope: architecture-aware initialization for PyTorch CNNs, with predictions that hold.

Plan and apply Xavier, Kaiming, LeCun, orthogonal and ASV (Adaptive Signal Variance) initializations
(or any method registered with :func:`register_method`) for any traceable model, and see, layer by
layer, the forward and gradient second moments each one is predicted to give.
"""

from initscope import models, rules  # noqa: F401  (rules: registers the built-in rules)
from initscope.api import init_, plan
from initscope.audit import Audit, audit
from initscope.errors import InitscopeError, PlanMismatchError, TraceError, UnknownOpError
from initscope.methods import METHODS, Method, register_method, unregister_method
from initscope.options import Options
from initscope.plan import InitPlan, LayerPlan, plan_of
from initscope.plan_cache import cache_info, clear_plan_cache
from initscope.probe import Probe, ProbeCallback, probe
from initscope.rules import Context, Rule, WeightRule, register_rule, unregister_rule
from initscope.sampling import sample_
from initscope.stats import Grad, Signal

__version__ = "0.1.0"

# The experiments' registries, imported when first asked for (the data and engine modules are not
# needed to plan or probe).
_LAZY = {
    "register_source": ("initscope.experiments.data", "register_source"),
    "register_engine": ("initscope.experiments.engines", "register_engine"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'initscope' has no attribute {name!r}")

__all__ = [
    "Audit",
    "METHODS",
    "Context",
    "Grad",
    "InitPlan",
    "InitscopeError",
    "LayerPlan",
    "Method",
    "Options",
    "PlanMismatchError",
    "Probe",
    "ProbeCallback",
    "Rule",
    "Signal",
    "TraceError",
    "UnknownOpError",
    "WeightRule",
    "audit",
    "cache_info",
    "clear_plan_cache",
    "init_",
    "models",
    "plan",
    "plan_of",
    "probe",
    "register_engine",
    "register_method",
    "register_rule",
    "register_source",
    "sample_",
    "unregister_method",
    "unregister_rule",
]
