"""What a plan holds, and writing it into a model."""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from initscope import draws
from initscope.errors import PlanMismatchError
from initscope.methods.base import METHODS
from initscope.sampling import unit_scale
from initscope.threads import one_intra_op_thread

if TYPE_CHECKING:
    from initscope.draws import Prefetch

# The plan last applied to each model, without an attribute on the user's module; an entry goes with
# its model.
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, InitPlan]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LayerPlan:
    """The plan for one weight layer.

    Attributes:
        name: qualified module name, as in ``model.named_modules()``.
        kind: ``conv1d``, ``conv2d``, ``conv3d`` or ``linear``.
        weight_shape: shape of the weight.
        std: standard deviation the weights are drawn with.
        distribution: ``normal``, ``uniform``, ``truncated_normal`` or ``orthogonal``.
        fan_in, fan_out: fans under the plan's ``fan`` option.
        eps: number of (input, output) pairs joined by a weight, taps on zero padding excluded.
        m_in, m_out: scalars entering and leaving the layer, per sample.
        tau_in: second moment of the layer's input in the paper's model (weight outputs i.i.d. N(0, 1)).
        gamma: gradient factor of what follows the layer, in the same model.
        clamped: the ASV clamp set the std.
        residual_scale: factor the residual policy put on this layer's std, if it is a branch's knob.
        pred_out_var: predicted ``E[u²]`` of the layer's output (i.i.d. N(0, 1) network input), for a
            typical weight draw (the geometric mean over draws; see ``docs/theory.md``, finite width).
        pred_in_grad_var: predicted ``E[(∂L/∂x)²]`` at the layer's input (i.i.d. N(0, 1) output gradient),
            for a typical draw.
        out_spread, grad_spread: predicted standard deviation of ``log2`` of those two over weight draws.
        calls: how many calls of the forward pass use this weight (the first call is the one described).
        bias: what is written to the bias: ``zero``, ``default`` (the module's own rule) or ``none``.
        weight_path, bias_path: the parameters written.
        shared: other modules that use the same weight ``Parameter`` (one std for all).
        other_bias_paths: their biases, written as ``bias`` says.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    std: float
    distribution: str
    fan_in: int
    fan_out: int
    eps: int
    m_in: int
    m_out: int
    tau_in: float
    gamma: float
    clamped: bool
    residual_scale: float | None
    pred_out_var: float
    pred_in_grad_var: float
    out_spread: float = 0.0
    grad_spread: float = 0.0
    calls: int = 1
    bias: str = "zero"
    weight_path: str = ""
    bias_path: str | None = None
    shared: tuple[str, ...] = ()
    other_bias_paths: tuple[str, ...] = ()


_TABLE = (
    ("layer", "name", "{}"),
    ("kind", "kind", "{}"),
    ("std", "std", "{:.4g}"),
    ("fan_in", "fan_in", "{}"),
    ("fan_out", "fan_out", "{}"),
    ("eps", "eps", "{:.4g}"),
    ("tau_in", "tau_in", "{:.4g}"),
    ("gamma", "gamma", "{:.4g}"),
    ("clamp", "clamped", "{}"),
    ("res", "residual_scale", "{:.3g}"),
    ("pred_out", "pred_out_var", "{:.3g}"),
    ("pred_grad", "pred_in_grad_var", "{:.3g}"),
)


# Which columns a narrow terminal keeps first.
COLUMN_PRIORITY = ("layer", "std", "pred_out", "pred_grad", "kind", "clamp", "fan_in", "fan_out", "tau_in", "gamma",
                   "res", "eps")


def _columns(titles: list[str] | None) -> tuple:
    if titles is None:
        return _TABLE
    by_title = {t: spec for t, *_ in _TABLE for spec in [(t, *_)]}
    unknown = [t for t in titles if t not in by_title]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; valid: {', '.join(by_title)}")
    return tuple(by_title[t] for t in titles)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return spec.format(value)


@dataclass
class InitPlan:
    """An initialization plan: a std per weight layer, and the second moments it is predicted to give.

    Make one with :func:`initscope.plan`; :meth:`apply` writes it into a model of the same architecture
    (the one it was made from, or any copy).

    The stds are chosen for training whatever mode the model is in (BatchNorm on batch statistics,
    dropout active); the predictions are for the modes it was in when planned. ``modes`` names the
    modules whose mode the predictions depend on (a BatchNorm with running statistics, a dropout) and
    whether each was training: :func:`initscope.probe` of the model in other modes makes the
    predictions again for them (:func:`initscope.planner.in_modes`).
    """

    method: str
    options: dict
    input_shape: Any
    layers: list[LayerPlan]
    norm_scales: dict[str, float] = field(default_factory=dict)
    residual: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    modes: dict[str, bool] = field(default_factory=dict)
    # The batch a data-dependent method (lsuv) sets its stds on when applied; not serialized.
    example: Any = field(default=None, repr=False, compare=False)
    # What the plan was made from (initscope.planner.Recipe), to make it again for other modes; not
    # serialized, and it holds no reference to the model.
    recipe: Any = field(default=None, repr=False, compare=False)

    def modes_differ(self, model: nn.Module) -> list[str]:
        """The modules of ``model`` whose mode the predictions depend on and which are now in another
        mode than when planned (``""`` is the model itself)."""
        named = dict(unwrap_model(model).named_modules())
        return [name for name, training in self.modes.items()
                if name in named and named[name].training != training]

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerPlan:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no weight layer named {key!r} in this plan")
        return self.layers[key]

    # -- applying ----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
        """Draw every planned layer's weights (and zero its bias) in ``model``; returns the model.

        Layers are drawn in the order of ``model.named_parameters()``. Everything is checked before
        anything is written: a model that does not match the plan raises
        :class:`~initscope.errors.PlanMismatchError` and keeps its weights.
        """
        return write_plan(self, model, generator)

    # -- reporting ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-serializable description of the plan."""
        return {
            "method": self.method,
            "options": dict(self.options),
            "input_shape": self.input_shape,
            "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(layer).items()} for layer in self.layers],
            "norm_scales": dict(self.norm_scales),
            "residual": dict(self.residual),
            "notes": list(self.notes),
            "modes": dict(self.modes),
        }

    def rows(self, columns: list[str] | None = None) -> list[list[str]]:
        """The per-layer table as strings, one row per layer (``columns``: titles, default all)."""
        specs = _columns(columns)
        return [[_fmt(getattr(layer, attr), spec) for _, attr, spec in specs] for layer in self.layers]

    @staticmethod
    def columns() -> list[str]:
        return [title for title, _, _ in _TABLE]

    def fit_columns(self, width: int, gap: int = 2) -> list[str]:
        """The most useful columns whose table fits in ``width`` characters with ``gap`` between
        columns (layer, std and the predictions first; see :data:`COLUMN_PRIORITY`), in the table's order."""
        rows = self.rows()
        widths = {h: max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(self.columns())}
        chosen: list[str] = []
        for title in COLUMN_PRIORITY:
            if sum(widths[t] + gap for t in chosen + [title]) - gap <= width or not chosen:
                chosen.append(title)
        return [t for t in self.columns() if t in chosen]

    def to_table(self, columns: list[str] | None = None) -> str:
        """The per-layer plan as an aligned text table (``columns``: titles, default all)."""
        header = [title for title, _, _ in _columns(columns)]
        rows = self.rows(columns)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"InitPlan({self.method}, {len(self.layers)} weight layers, input {self.input_shape})"
        return head + "\n" + self.to_table()

    def __repr__(self) -> str:
        return f"InitPlan(method={self.method!r}, layers={len(self.layers)}, input_shape={self.input_shape!r})"


def write_plan(plan: InitPlan, model: nn.Module, generator: torch.Generator | None = None,
               prefetch: "Prefetch | None" = None) -> nn.Module:
    """What :meth:`InitPlan.apply` does; ``prefetch`` holds unit draws made ahead (:mod:`initscope.draws`).

    Three phases, so that a failure leaves every weight as it was: check that the model matches,
    draw everything (into buffers, in float32 for reduced-precision weights), then write.
    """
    model = unwrap_model(model)
    writes, norms = _check(plan, model, generator)
    # -- draw: everything the plan writes, before anything is written ---------------------------------
    rank = {id(p): i for i, p in enumerate(model.parameters())}
    writes.sort(key=lambda item: rank.get(id(item[1]), len(rank)))
    order = [(layer.weight_path, bool(biases) and layer.bias == "default") for layer, _, biases in writes]
    drawn = prefetch.take(order) if prefetch is not None else None
    buffers: list[torch.Tensor] = []
    try:
        with torch.no_grad(), one_intra_op_thread():
            method = METHODS[plan.method] if plan.method in METHODS else None
            units = []
            for layer, weight, biases in writes:
                if drawn is not None:
                    unit, first_bias = drawn[layer.weight_path]
                    bias_units = [first_bias] if first_bias is not None else []
                else:
                    unit = draws.draw_unit(weight, layer.distribution, generator)
                    bias_units = [draws.draw_default_bias(weight, b, generator) for b in biases] \
                        if layer.bias == "default" else []
                buffers += [unit, *bias_units]
                units.append((unit, bias_units))
            if method is not None and method.adjusts:
                # The method rescales the scaled draws on data (lsuv); they are still buffers.
                candidates = {}
                for (layer, weight, _), (unit, _) in zip(writes, units):
                    candidates[layer.weight_path] = unit.mul_(unit_scale(layer.std, layer.distribution, tuple(weight.shape)))
                method.adjust(model, plan, candidates)
            # -- write --------------------------------------------------------------------------------
            for (layer, weight, biases), (unit, bias_units) in zip(writes, units):
                _write(layer, weight, biases, unit, bias_units, scaled=method is not None and method.adjusts)
            if drawn is not None:
                prefetch.commit()
            for module, alpha in norms:
                module.weight.fill_(alpha)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    finally:
        draws.recycle(buffers)
    # Remembered so that tools which look at the model later (the probe) can set its predictions
    # beside what they measure without being handed the plan again.
    try:
        _APPLIED[model] = plan
    except TypeError:  # a model that cannot be weakly referenced is simply not remembered
        pass
    return model


def _check(plan: InitPlan, model: nn.Module, generator: torch.Generator | None) -> tuple[list, list]:
    """Every parameter (and normalization) the plan writes, looked up and checked; raises before
    anything is drawn."""
    writes, problems = [], []
    for layer in plan.layers:
        try:
            weight = model.get_parameter(layer.weight_path)
        except AttributeError:
            problems.append(f"{layer.weight_path}: no such parameter")
            continue
        if tuple(weight.shape) != tuple(layer.weight_shape):
            problems.append(f"{layer.weight_path}: shape {tuple(weight.shape)}, planned {tuple(layer.weight_shape)}")
            continue
        biases = []
        for path in ([layer.bias_path] if layer.bias_path is not None else []) + list(layer.other_bias_paths):
            try:
                biases.append(model.get_parameter(path))
            except AttributeError:
                problems.append(f"{path}: no such parameter")
        writes.append((layer, weight, biases))
    norms = []
    for name, alpha in plan.norm_scales.items():
        try:
            norms.append((model.get_submodule(name), alpha))
        except AttributeError:
            problems.append(f"{name}: no such module")
    if problems:
        raise PlanMismatchError(
            f"this plan ({plan.method}) was made for another model; nothing was written:\n  " + "\n  ".join(problems)
        )
    tensors = [t for _, w, bs in writes for t in (w, *bs)]
    meta = [layer.weight_path for layer, w, _ in writes if w.is_meta]
    if meta:
        raise ValueError(
            f"{len(meta)} weight(s) are on the meta device ({meta[0]}, ...): they hold no memory to write to. "
            "Materialize the model first (model.to_empty(device='cpu'), or build it outside torch.device('meta')), "
            "then apply the plan; nothing was written"
        )
    if any(not t.is_floating_point() for t in tensors):
        bad = next(layer.weight_path for layer, w, _ in writes if not w.is_floating_point())
        raise ValueError(f"{bad} is not a floating-point tensor; nothing was written")
    if generator is not None:
        devices = {t.device.type for t in tensors}
        if any(d != generator.device.type for d in devices):
            raise ValueError(
                f"generator is on {generator.device}, the weights on {sorted(devices)}: pass a generator on the "
                "weights' device; nothing was written"
            )
    return writes, norms


def _write(layer: LayerPlan, weight: torch.Tensor, biases: list[torch.Tensor], unit: torch.Tensor,
           bias_units: list[torch.Tensor], scaled: bool = False) -> None:
    """Scale a unit draw into ``weight`` (``scaled``: it already is); biases get their draws
    (``default``) or zeros."""
    scale = unit_scale(layer.std, layer.distribution, tuple(weight.shape))
    if scaled:
        weight.copy_(unit)
    elif unit.dtype == weight.dtype:
        torch.mul(unit, scale, out=weight)
    else:  # drawn in float32 for a reduced-precision weight: one rounding, at the end
        weight.copy_(unit.mul_(scale))
    for i, bias in enumerate(biases):
        if layer.bias == "default":
            bias.copy_(bias_units[i])
        else:
            bias.zero_()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DataParallel``/``DistributedDataParallel`` wrapper or a ``torch.compile``
    result, whose parameters are the wrapper's: plans are made and written on the model itself."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def plan_of(model: nn.Module) -> InitPlan | None:
    """The :class:`InitPlan` last applied to ``model`` by :meth:`InitPlan.apply` (or ``init_``), if any."""
    try:
        return _APPLIED.get(unwrap_model(model))
    except TypeError:  # not weak-referenceable: nothing was applied to it
        return None
