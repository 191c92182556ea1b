"""Which rule handles which op: a registry keyed by module class, function, or tensor-method name.

Lookups follow the traced graph: ``call_module`` nodes dispatch on the submodule's class,
``call_function`` nodes on the function object (``operator.add``, ``torch.cat``, ``F.relu``), and
``call_method`` nodes on the method name (``"view"``, ``"relu"``). An op with no rule is an error
unless the caller asks otherwise (``on_unknown``).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from initscope.rules.base import Rule, WeightRule

_MODULES: dict[type, Rule] = {}
_FUNCTIONS: dict[Any, Rule] = {}
_METHODS: dict[str, Rule] = {}
# Bumped on every change, so that plans remembered under other rules are dropped.
_version = 0

R = TypeVar("R")


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return f"tensor method {target!r}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def register_rule(*targets: Any, overwrite: bool = False) -> Callable[[R], R]:
    """Register how second moments pass through ``targets``; use as a class decorator.

    A target is a module class (``MyBlock``), a function (``torch.nn.functional.gelu``), or the name of a
    tensor method (``"gelu"``). The decorated class must subclass :class:`initscope.Rule`; it is
    instantiated once. Registering a target twice raises ``ValueError`` unless ``overwrite=True``.

    Examples:
        >>> import initscope
        >>> from torch import nn
        >>> class Doubler(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> @initscope.register_rule(Doubler)
        ... class DoublerRule(initscope.Rule):
        ...     def forward(self, ctx, x):
        ...         return x.scaled(4.0)
        ...     def backward(self, ctx, grad):
        ...         return {ctx.args[0]: grad.scaled(4.0)}
    """
    if not targets:
        raise ValueError("register_rule needs at least one target: a module class, a function, or a method name")

    def decorate(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"register_rule decorates subclasses of initscope.Rule, got {cls!r}")
        rule = cls()
        for target in targets:
            table = _table_for(target)
            if target in table and not overwrite:
                raise ValueError(
                    f"a rule for {_describe(target)} is already registered ({type(table[target]).__name__}); "
                    "pass overwrite=True to replace it"
                )
            table[target] = rule
        _bump()
        return cls

    return decorate


def _table_for(target: Any) -> dict:
    if isinstance(target, str):
        return _METHODS
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"a class target must be an nn.Module subclass, got {target!r}")
        return _MODULES
    if callable(target):
        return _FUNCTIONS
    raise TypeError(f"cannot register a rule for {target!r}: expected a module class, a function or a method name")


def unregister_rule(*targets: Any) -> None:
    """Remove the rules for ``targets`` (for tests and for replacing a built-in rule by hand)."""
    for target in targets:
        _table_for(target).pop(target, None)
    _bump()


def _bump() -> None:
    global _version
    _version += 1


def version() -> int:
    """A counter that changes whenever a rule is registered or removed."""
    return _version


def module_rule(module: nn.Module) -> Rule | None:
    """The rule for a module: its class's, or an ancestor's when the class does not override ``forward``."""
    cls = type(module)
    rule = _MODULES.get(cls)
    if rule is not None:
        return rule
    for base in cls.__mro__[1:]:
        if base in _MODULES and cls.forward is base.forward:
            return _MODULES[base]
    return None


def function_rule(fn: Any) -> Rule | None:
    return _FUNCTIONS.get(fn)


def method_rule(name: str) -> Rule | None:
    return _METHODS.get(name)


def has_module_rule(module: nn.Module) -> bool:
    return module_rule(module) is not None


def is_weight_module(module: nn.Module) -> bool:
    """Whether initscope draws this module's weights: its rule is a :class:`WeightRule` (Conv1d/2d/3d,
    Linear, and any module registered with one). The one definition of a weight layer."""
    return isinstance(module_rule(module), WeightRule)
