"""``probe()``: one forward and one backward pass that measures every layer, beside the plan's predictions."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from initscope.errors import InitscopeError, PlanMismatchError, ProbeError
from initscope.plan import InitPlan, plan_of, unwrap_model
from initscope.probe.hooks import QUANTITIES, Recorder, Selection, select
from initscope.probe.summary import DEFAULT_BINS, DEFAULT_SAMPLE, QUANTILE_COLUMNS, Stats

if TYPE_CHECKING:  # pandas costs 0.8 s to import; only the functions that build frames need it
    import pandas as pd

STAT_COLUMNS: tuple[str, ...] = (
    "count", "mean", "var", "second_moment", "min", "max", *QUANTILE_COLUMNS, "zero_frac", "nonfinite",
    "hist_lo", "hist_hi", "hist_counts",
)
PRED_COLUMNS: tuple[str, ...] = (
    "pred_out_var", "pred_in_grad_var", "pred_out_spread", "pred_grad_spread", "meas_out_var", "meas_in_grad_var",
    "out_ratio", "in_grad_ratio", "grad_scale", "draws", "flag_out_bits", "flag_grad_bits", "flagged",
)
COLUMNS: tuple[str, ...] = ("layer", "index", "kind", "quantity", *STAT_COLUMNS, *PRED_COLUMNS)
# A measurement is flagged when it lies outside what the plan predicts for it: more than FLAG_Z of the
# plan's own draw-to-draw spread away (log2 units, shrinking as 1/sqrt(draws) when draws are averaged),
# and never closer than FLAG_FLOOR_BITS (the rules' own accuracy: measured within 0.75 bits on the
# agreement nets), so that one draw's scatter deep in a plain net reads as what it is.
FLAG_Z = 3.0
FLAG_FLOOR_BITS = 1.0


def flag_limit(spread: float, draws: int = 1) -> float:
    """How far (in bits, |log2(measured / predicted)|) a measurement may lie from its prediction."""
    if not (math.isfinite(spread) and spread > 0):
        return FLAG_FLOOR_BITS
    return max(FLAG_FLOOR_BITS, FLAG_Z * spread / math.sqrt(max(draws, 1)))
_NAN = float("nan")
_TEXT_COLUMNS = ("method", "layer", "kind", "quantity")


def _ratio(measured: float, predicted: float) -> float:
    if not (math.isfinite(predicted) and predicted > 0):
        return _NAN
    return measured / predicted


@dataclass
class LayerStats:
    """One probed layer: its statistics per quantity and, with a plan, its predictions.

    ``stats`` maps each quantity (``weight``, ``output``, ``activation``, ``output_grad``, ``input_grad``,
    ``weight_grad``) the layer has to its :class:`~initscope.probe.summary.Stats`.
    """

    name: str
    kind: str
    index: int
    stats: dict[str, Stats] = field(default_factory=dict)
    pred_out_var: float = _NAN
    pred_in_grad_var: float = _NAN
    pred_out_spread: float = _NAN  # the plan's sd of log2 of one draw's pred_out_var
    pred_grad_spread: float = _NAN
    draws: int = 1  # draws the measurements average (geometric mean)
    # E[g²] at the network's output under the loss that was probed: the plans predict for a unit output
    # gradient (1 for probe()'s own loss), and the backward pass is linear in it, so a training loss's
    # gradients are compared with pred_in_grad_var × grad_scale (pred_in_grad_var stays the plan's).
    grad_scale: float = 1.0

    @property
    def meas_out_var(self) -> float:
        """Measured ``E[u²]`` at the layer's output (the plan's ``pred_out_var`` is of the same quantity)."""
        s = self.stats.get("output")
        return s.second_moment if s is not None else _NAN

    @property
    def meas_in_grad_var(self) -> float:
        """Measured ``E[(∂L/∂x)²]`` at the layer's input."""
        s = self.stats.get("input_grad")
        return s.second_moment if s is not None else _NAN

    @property
    def out_ratio(self) -> float:
        return _ratio(self.meas_out_var, self.pred_out_var)

    @property
    def in_grad_ratio(self) -> float:
        """Measured over predicted input gradient, the prediction scaled to the probed loss (``grad_scale``)."""
        return _ratio(self.meas_in_grad_var, self.pred_in_grad_var * self.grad_scale)

    @property
    def nonfinite(self) -> int:
        return sum(s.nonfinite for s in self.stats.values())

    @property
    def flag_out_bits(self) -> float:
        """How far the measured output may lie from the prediction, in bits (:func:`flag_limit`)."""
        return flag_limit(self.pred_out_spread, self.draws)

    @property
    def flag_grad_bits(self) -> float:
        return flag_limit(self.pred_grad_spread, self.draws)

    @property
    def flagged(self) -> bool:
        """A ratio further from 1 than the plan's own spread allows (:func:`flag_limit`), a ratio that is
        not a number where there is a prediction, or a non-finite entry."""
        if self.nonfinite > 0:
            return True
        checks = [(self.pred_out_var, self.out_ratio, self.flag_out_bits)]
        if math.isfinite(self.grad_scale):  # a loss whose output gradient was not seen cannot be compared
            checks.append((self.pred_in_grad_var, self.in_grad_ratio, self.flag_grad_bits))
        for pred, ratio, limit in checks:
            if math.isfinite(pred) and pred > 0 and not (ratio > 0 and abs(math.log2(ratio)) <= limit):
                return True
        return False

    def layer_columns(self) -> dict:
        return {
            "pred_out_var": float(self.pred_out_var),
            "pred_in_grad_var": float(self.pred_in_grad_var),
            "pred_out_spread": float(self.pred_out_spread),
            "pred_grad_spread": float(self.pred_grad_spread),
            "meas_out_var": float(self.meas_out_var),
            "meas_in_grad_var": float(self.meas_in_grad_var),
            "out_ratio": float(self.out_ratio),
            "in_grad_ratio": float(self.in_grad_ratio),
            "grad_scale": float(self.grad_scale),
            "draws": int(self.draws),
            "flag_out_bits": float(self.flag_out_bits),
            "flag_grad_bits": float(self.flag_grad_bits),
            "flagged": bool(self.flagged),
        }


class Probe:
    """The result of :func:`probe`: one :class:`LayerStats` per layer, in the order of the forward pass."""

    def __init__(self, layers: list[LayerStats], method: str | None = None) -> None:
        self.layers = layers
        self.method = method

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, key: int | str) -> LayerStats:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no probed layer named {key!r}; probed: {', '.join(l.name for l in self.layers)}")
        return self.layers[key]

    @property
    def flagged(self) -> list[str]:
        """Names of the flagged layers (see :attr:`LayerStats.flagged`)."""
        return [layer.name for layer in self.layers if layer.flagged]

    def to_frame(self) -> pd.DataFrame:
        """A tidy table: one row per (layer, quantity), the columns of :data:`COLUMNS`, in that order."""
        import pandas as pd

        rows = []
        for layer in self.layers:
            per_layer = layer.layer_columns()
            for quantity in QUANTITIES:
                s = layer.stats.get(quantity)
                if s is None:
                    continue
                rows.append({"layer": layer.name, "index": layer.index, "kind": layer.kind, "quantity": quantity,
                             **s.as_row(), **per_layer})
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        return frame.astype({"index": "int64", "count": "int64", "nonfinite": "int64", "draws": "int64", "flagged": "bool"})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_frame` to ``path``: Parquet for ``.parquet``, CSV for ``.csv``."""
        return save_frame(self.to_frame(), path)

    @staticmethod
    def load(path: str | Path) -> pd.DataFrame:
        """Read a table written by :meth:`save` (or :func:`save_frame`) back into a frame."""
        return load_frame(path)

    def __repr__(self) -> str:
        flagged = self.flagged
        return f"Probe({len(self.layers)} layers, method={self.method!r}, flagged={flagged})"


def save_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a probe table as Parquet (``.parquet``) or CSV (``.csv``, ``hist_counts`` as JSON strings)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"cannot save to {str(path)!r}: the suffix must be .parquet or .csv, not {suffix or 'none'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        out = frame.copy()
        if "hist_counts" in out:
            out["hist_counts"] = [json.dumps([int(c) for c in counts]) for counts in out["hist_counts"]]
        out.to_csv(path, index=False)
    return path


def load_frame(path: str | Path) -> pd.DataFrame:
    """Read a probe table written by :func:`save_frame`; ``hist_counts`` comes back as lists of ints."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        if "hist_counts" in frame:
            frame["hist_counts"] = [[int(c) for c in counts] for counts in frame["hist_counts"]]
    elif suffix == ".csv":
        # Layer names such as "0" (nn.Sequential) must stay strings.
        header = pd.read_csv(path, nrows=0).columns
        frame = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS if c in header}, keep_default_na=False,
                            na_values={c: ["", "NaN", "nan"] for c in header if c not in _TEXT_COLUMNS})
        if "hist_counts" in frame:
            frame["hist_counts"] = [json.loads(text) for text in frame["hist_counts"]]
    else:
        raise ValueError(f"cannot load {str(path)!r}: the suffix must be .parquet or .csv, not {suffix or 'none'!r}")
    if "in_grad_ratio" in frame and "grad_scale" not in frame:  # written before the column was: a unit loss's
        frame.insert(list(frame.columns).index("in_grad_ratio") + 1, "grad_scale", 1.0)
    return frame


# -- the pass ------------------------------------------------------------------------------------------
def check_plan(model: nn.Module, plan: InitPlan) -> None:
    """Raise :class:`PlanMismatchError` unless every layer of ``plan`` is in ``model`` with the planned weight shape."""
    named = dict(model.named_modules())
    problems = []
    for layer in plan.layers:
        module = named.get(layer.name)
        if module is None:
            problems.append(f"{layer.name}: no such module")
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and tuple(w.shape) != tuple(layer.weight_shape):
            problems.append(f"{layer.name}: weight shape {tuple(w.shape)}, planned {tuple(layer.weight_shape)}")
    if problems:
        raise PlanMismatchError(
            f"this plan ({plan.method}) was made for another model, so its predictions cannot be set beside "
            "this model's measurements:\n  " + "\n  ".join(problems[:20])
            + (f"\n  ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
        )


def plan_for_modes(model: nn.Module, plan: InitPlan) -> InitPlan:
    """``plan``, or, when some module its predictions depend on (a BatchNorm with running statistics,
    a dropout) is now in another mode than when planned, the plan made again for the modes now: same
    stds, predictions for what the model will do (a BatchNorm in eval mode divides by its running
    statistics and renormalizes nothing). A plan that cannot be made again is kept, with a warning."""
    changed = plan.modes_differ(model)
    if not changed:
        return plan
    from initscope.planner import in_modes

    now = "eval" if not dict(unwrap_model(model).named_modules())[changed[0]].training else "train"
    where = f"{', '.join(repr(n) for n in changed[:3])}{', ...' if len(changed) > 3 else ''}"
    try:
        again = in_modes(model, plan)
    except (InitscopeError, ValueError, TypeError, RuntimeError) as exc:
        warnings.warn(
            f"the plan's predictions are for the modes the model was planned in, and {len(changed)} module(s) whose "
            f"work depends on the mode are now in {now} mode ({where}), and the plan could not be made again for "
            f"that ({exc}). The ratios from there on compare different modes: probe in the mode planned, or plan "
            "again.",
            stacklevel=3,
        )
        return plan
    planned = {layer.name: layer.std for layer in plan.layers}
    moved = [layer.name for layer in again.layers
             if not math.isclose(layer.std, planned.get(layer.name, math.nan), rel_tol=1e-9, abs_tol=0.0)]
    if moved:
        warnings.warn(
            f"the predictions for the model's modes now ({len(changed)} module(s) in {now} mode: {where}) come from "
            f"planning it again, and that plan's stds differ from the given plan's at {len(moved)} layer(s) "
            f"({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''}): the model's normalization parameters "
            "changed since it was planned, so the predictions are for the model as it is now",
            stacklevel=3,
        )
    return again


def _expected(module: nn.Module | None) -> str:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d = len(module.kernel_size)
        spatial = ("L",) if d == 1 else ("H", "W") if d == 2 else ("D", "H", "W")
        return f"; it expects (N, {module.in_channels}, {', '.join(spatial)})"
    if isinstance(module, nn.Linear):
        return f"; it expects (..., {module.in_features})"
    return ""


def _context(model: nn.Module, x: torch.Tensor, recorder: Recorder, plan: InitPlan | None, exc: Exception) -> str:
    parts = [f"probe: {type(model).__name__} raised {type(exc).__name__} on a batch of shape {tuple(x.shape)}"]
    inner = [entry for entry in recorder.stack if entry[0]]
    if inner:
        name, module, shape = inner[-1]
        what = f" ({type(module).__name__})" if module is not None else ""
        got = f" on an input of shape {shape}" if shape is not None else ""
        parts.append(f" in {name!r}{what}{got}{_expected(module)}")
    if plan is not None and isinstance(plan.input_shape, (tuple, list)):
        parts.append(f"; the plan was made for batches of shape (N, {', '.join(str(s) for s in plan.input_shape)})")
    parts.append(f": {exc}\nThe model was left as it was (hooks removed, buffers and gradients untouched).")
    return "".join(parts)


def _loss(out, targets, loss_fn: Callable | None, seed: int) -> torch.Tensor:
    if targets is None and loss_fn is None:
        if not isinstance(out, torch.Tensor):
            raise ProbeError(
                f"probe: the model returned a {type(out).__name__}, not a tensor; pass loss_fn= (a function of the "
                "output, or of output and targets) to make a scalar loss from it"
            )
        # L = Σ out·ξ with ξ i.i.d. N(0, 1): ∂L/∂out = ξ has unit variance, as the plan's predictions assume.
        gen = torch.Generator().manual_seed(seed)
        dtype = out.dtype if out.is_floating_point() else torch.float32
        noise = torch.randn(out.shape, generator=gen, dtype=dtype).to(out.device)
        return (out * noise).sum()
    loss = loss_fn(out) if targets is None else (loss_fn or F.cross_entropy)(out, targets)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ProbeError(f"probe: the loss must be a scalar tensor, got {got}")
    return loss.reshape(())


def probe(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None, *,
          loss_fn: Callable | None = None, plan: InitPlan | None = None, layers: str | Sequence[str] = "weighted",
          bins: int = DEFAULT_BINS, quantiles: bool = True, histograms: bool = True, sample: int = DEFAULT_SAMPLE,
          seed: int = 0, quantities: Sequence[str] = QUANTITIES) -> Probe:
    """Measure every layer's weights, output, activation and gradients in one forward and backward pass.

    With no ``targets`` (and no ``loss_fn``) the loss is :math:`L = \\sum_i y_i \\xi_i` with :math:`\\xi` fixed
    i.i.d. N(0, 1) noise (seeded by ``seed``), so :math:`\\partial L / \\partial y = \\xi` has unit variance as the
    plan's ``pred_in_grad_var`` assumes. With ``targets`` it is ``loss_fn(output, targets)`` (cross-entropy
    by default); with ``loss_fn`` alone, ``loss_fn(output)``. Gradients are taken with
    ``torch.autograd.grad``, so no parameter's ``.grad`` changes; module hooks are removed, and buffers
    (BatchNorm's running statistics) restored, even when the model raises. The mode (train/eval) is the
    model's own, and so are the predictions: a plan made in another mode is made again for this one
    (:func:`plan_for_modes`; a BatchNorm in eval mode divides by its running statistics).

    Args:
        model: any ``nn.Module`` taking one tensor.
        inputs: the batch (not modified; a copy that requires grad goes through the model).
        targets: targets for ``loss_fn``.
        loss_fn: see above.
        plan: an :class:`~initscope.InitPlan` for the predictions; default :func:`initscope.plan_of` ``(model)``.
        layers: ``"weighted"`` (Conv1d/2d/3d, Linear), ``"all"`` (also activations, pooling, norms and
            residual adds) or a list of names.
        bins: histogram bins.
        quantiles, histograms: take them (they are most of the cost).
        sample: quantiles and histograms from at most this many entries per tensor (see
            :mod:`initscope.probe.summary` for the error bound).
        seed: seeds the noise and the subsamples.
        quantities: which of ``weight``, ``output``, ``activation``, ``output_grad``, ``input_grad``,
            ``weight_grad`` to take.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> p = probe(net, torch.randn(8, 4))
        >>> p["0"].stats["output"].count, p["0"].stats["activation"].count
        (24, 24)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # DataParallel, torch.compile: the layers are the wrapped model's
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor (one batch), got {type(inputs).__name__}")
    if plan is None:
        plan = plan_of(model)
    elif not isinstance(plan, InitPlan):
        raise TypeError(f"plan must be an InitPlan or None, got {type(plan).__name__}")
    if plan is not None:
        check_plan(model, plan)
        if isinstance(plan.input_shape, (tuple, list)) and tuple(inputs.shape[1:]) != tuple(plan.input_shape):
            warnings.warn(
                f"the plan's predictions are for samples of shape {tuple(plan.input_shape)}, the batch's are "
                f"{tuple(inputs.shape[1:])}: the ratios compare different inputs",
                stacklevel=2,
            )
        plan = plan_for_modes(model, plan)
    selection = select(model, layers)
    recorder = Recorder(model, selection, quantities=quantities, bins=bins, quantiles=quantiles,
                        histograms=histograms, sample=sample, seed=seed)
    scale = run_pass(model, inputs, targets, loss_fn, recorder, plan, seed)
    return build(recorder, plan, scale)


def run_pass(model: nn.Module, inputs: torch.Tensor, targets, loss_fn, recorder: Recorder, plan: InitPlan | None,
             seed: int) -> float:
    """One forward and backward pass with ``recorder``'s hooks; the model is left as it was, whatever happens.

    Returns ``E[g²]`` at the output under the loss: 1 for the unit-noise loss (what the plans assume, by
    construction), the measured value for a training loss (NaN where the output takes no gradient)."""
    unit_loss = targets is None and loss_fn is None
    scale = 1.0 if unit_loss else _NAN
    x = inputs.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    recorder.install()
    try:
        try:
            out = recorder.run(x)
        except Exception as exc:
            raise ProbeError(_context(model, x, recorder, plan, exc)) from exc
        try:
            loss = _loss(out, targets, loss_fn, seed)
        except ProbeError:
            raise
        except Exception as exc:
            raise ProbeError(f"probe: the loss raised {type(exc).__name__} on an output of shape "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}: {exc}") from exc
        weights = recorder.take_weights()
        wrt = ([x] if x.requires_grad else []) + list(weights.values())
        at_out = not unit_loss and isinstance(out, torch.Tensor) and out.requires_grad
        if at_out:
            wrt.append(out)
        if wrt and loss.requires_grad:
            try:
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            except Exception as exc:
                raise ProbeError(f"probe: the backward pass raised {type(exc).__name__}: {exc}") from exc
            if at_out:
                g_out, grads = grads[-1], grads[:-1]
                if g_out is not None:
                    scale = float(g_out.detach().double().pow(2).mean())
            recorder.take_weight_grads(dict(zip(weights, grads[len(grads) - len(weights):])))
    finally:
        recorder.remove()
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
    return scale


def build(recorder: Recorder, plan: InitPlan | None, grad_scale: float | None = None) -> Probe:
    """The :class:`Probe` of what ``recorder`` collected, with ``plan``'s predictions set beside it.

    ``grad_scale`` is ``E[g²]`` at the network's output under the loss (see :class:`LayerStats`); None (a
    training step's own loss, which the recorder does not see) takes it as measured at the output of the
    last weight layer in the forward pass, the network's output in a classifier."""
    preds = {layer.name: layer for layer in plan.layers} if plan is not None else {}
    layers = []
    for rec in recorder.called():
        lp = preds.get(rec.name)
        layers.append(LayerStats(rec.name, rec.kind, rec.index, dict(rec.stats),
                                 float(lp.pred_out_var) if lp is not None else _NAN,
                                 float(lp.pred_in_grad_var) if lp is not None else _NAN,
                                 float(lp.out_spread) if lp is not None else _NAN,
                                 float(lp.grad_spread) if lp is not None else _NAN))
    if grad_scale is None:
        last = [layer for layer in layers if math.isfinite(layer.pred_in_grad_var) and "output_grad" in layer.stats]
        grad_scale = last[-1].stats["output_grad"].second_moment if last else _NAN
    for layer in layers:
        layer.grad_scale = grad_scale
    missing = recorder.uncalled()
    if missing:
        warnings.warn(f"not called in the forward pass, so not probed: {', '.join(missing)}", stacklevel=3)
    bad = [layer.name for layer in layers if layer.nonfinite > 0]
    if bad:
        warnings.warn(
            f"non-finite values (NaN or inf) in {', '.join(bad)}: their rows are flagged, and their statistics are "
            "over the finite entries only",
            stacklevel=3,
        )
    return Probe(layers, plan.method if plan is not None else None)


__all__ = ["COLUMNS", "LayerStats", "Probe", "ProbeError", "build", "check_plan", "load_frame", "probe", "run_pass",
           "save_frame", "Selection"]
