"""What an initialization method is: an object in a registry that sets each weight layer's std.

A method sees each weight layer through a :class:`Layer` (its geometry, its fans, and the paper's τ
and γ around it) and answers with a standard deviation (:meth:`Method.std`). That is all a
fixed-formula method needs. A method may do more: choose its stds while the full propagation runs
(:meth:`Method.full_pass`; the exact ASV variants), fix the law it draws from (orthogonal), draw
biases its own way (the modules' default), set a default residual policy, or need a batch of data.
The planner reads those attributes and calls those hooks; it never asks for a method by name.

Register one with :func:`register_method`::

    @initscope.register_method("kaiming-1.5")
    class Kaiming15(initscope.Method):
        summary = "Kaiming fan_in with gain 1.5"

        def std(self, layer, options):
            fan_in, _ = layer.fans(options.fan)
            return 1.5 * math.sqrt(2.0 / fan_in), False
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

from initscope.options import FANS, Options
from initscope.registry import Registry
from initscope.rules.base import LayerGeometry

DIRECTIONS = ("forward", "backward")


@dataclass
class Layer:
    """What a method sees of one weight layer.

    Attributes:
        name: qualified module name.
        geometry: kind, weight shape, groups, true fans, ε, M and M' (see :class:`LayerGeometry`).
        weight: the parameter the plan will draw (read its shape and dtype, never its values).
        tau_in: second moment of the layer's input in the paper's model (weight outputs i.i.d. N(0, 1)).
        gamma: gradient factor of what follows the layer, in the same model.
    """

    name: str
    geometry: LayerGeometry
    weight: nn.Parameter
    tau_in: float
    gamma: float

    def fans(self, convention: str = "true") -> tuple[int, int]:
        """``(fan_in, fan_out)``: ``"true"`` counts groups as they are, ``"framework"`` as torch.nn.init does.

        torch.nn.init computes fans from the weight's shape alone, so a depthwise weight (C, 1, k, k)
        gets fan_out = C k², C times too large (pytorch issue 23854).
        """
        if convention == "true":
            return self.geometry.fan_in, self.geometry.fan_out
        if convention == "framework":
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(self.weight)
            return int(fan_in), int(fan_out)
        raise ValueError(f"fan={convention!r} is not one of {FANS}")


class Method:
    """An initialization method. Subclass it, set the attributes, implement :meth:`std`.

    Attributes:
        name: the name ``plan`` and ``init_`` take (set by :func:`register_method`).
        summary: one line for listings (``initscope methods``).
        direction: the signal it keeps, ``"forward"`` or ``"backward"``: the ASV clamp's reference
            and what an error says is missing.
        distribution: the law it draws from by default (``normal``, ``uniform``,
            ``truncated_normal``), or ``orthogonal``.
        fixed_distribution: the method draws its own way; ``distribution=`` is refused.
        bias: what is written to biases: ``"zero"``, or ``"default"`` (the module's own rule).
        residual: the default residual policy (``none``, ``scale``, ``zero``).
        exact: the std is chosen from the full propagation (:meth:`full_pass`), not from a formula.
        needs_data: the method needs ``example_input`` (a real batch) to plan.
        adjusts: the drawn weights are rescaled on data before they are written (:meth:`adjust`).
        reads_weights: the stds depend on the values the weights hold now (the plan cache, which keys
            plans by shapes and never by drawn values, keeps none of its plans).
    """

    name: str = ""
    summary: str = ""
    direction: str = "forward"
    distribution: str = "normal"
    fixed_distribution: bool = False
    bias: str = "zero"
    residual: str = "none"
    exact: bool = False
    needs_data: bool = False
    adjusts: bool = False
    reads_weights: bool = False

    def std(self, layer: Layer, options: Options) -> tuple[float, bool]:
        """The std of ``layer``'s weights, and whether a clamp set it."""
        raise NotImplementedError(f"method {self.name!r} does not say how to set a std")

    def bias_m2(self, layer: Layer) -> float:
        """The second moment of the bias this method draws (0 for zero biases)."""
        return 0.0

    def law(self, options: Options) -> str:
        """The distribution every layer of the plan is drawn from."""
        return options.distribution or self.distribution

    def check(self, options: Options, example_input: Any) -> None:
        """Refuse options (or a missing batch) this method cannot plan with, naming what to do."""
        if options.distribution is not None and self.fixed_distribution:
            raise ValueError(f"method {self.name!r} draws its own way ({self.distribution}); leave distribution=None")
        if self.needs_data and example_input is None:
            raise ValueError(f"method {self.name!r} sets its stds from data: pass example_input=<a batch>")

    def adjust(self, model: nn.Module, plan: Any, candidates: dict) -> None:
        """Rescale the drawn weights (``candidates``: weight path -> tensor, in place) before they are
        written; for methods that set their scale on data (``adjusts = True``)."""

    def full_pass(self, job: Any) -> Any:
        """The full propagation with this method's stds (:class:`initscope.planner.Job`); the exact
        variants override it to choose their stds while it runs."""
        return job.run_fixed()

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {self.summary}>"


METHODS: Registry[Method] = Registry("method")

M = TypeVar("M", bound=type)


def register_method(name: str, *, overwrite: bool = False) -> Callable[[M], M]:
    """Register an initialization method under ``name``; use as a class decorator.

    The decorated class must subclass :class:`Method`; it is instantiated once, with ``name`` set.
    Registering a name twice raises ``ValueError`` unless ``overwrite=True``.

    Examples:
        >>> @initscope.register_method("kaiming-1.5")
        ... class Kaiming15(initscope.Method):
        ...     summary = "Kaiming fan_in with gain 1.5"
        ...     def std(self, layer, options):
        ...         return 1.5 * math.sqrt(2.0 / layer.fans(options.fan)[0]), False
    """

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method decorates subclasses of initscope.Method, got {cls!r}")
        if cls.direction not in DIRECTIONS:
            raise ValueError(f"{cls.__name__}.direction={cls.direction!r} is not one of {DIRECTIONS}")
        method = cls()
        method.name = name
        METHODS.add(name, method, overwrite=overwrite)
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (for tests, and for replacing a built-in by hand)."""
    METHODS.remove(name)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name raises a ``ValueError`` listing the valid ones."""
    return METHODS.get(name)


def check_finite(std: float, layer: Layer, method: Method) -> float:
    """``std``, or an error that says why a formula gave none (no signal or gradient reaches the layer)."""
    if not math.isfinite(std):
        forward = method.direction == "forward"
        raise ValueError(
            f"layer {layer.name!r} gets no {'signal' if forward else 'gradient'} in the paper's model "
            f"({'tau' if forward else 'gamma'} = 0): {method.name} is undefined there; keep the clamp (max_std_ratio) on"
        )
    return std
