"""The probe during training: the same statistics every N steps, to TensorBoard and to a table.

Two ways to call it from a training loop (``callback = ProbeCallback(every=100, writer="runs/x")``):

1. ``callback(step, model, inputs, targets, loss_fn)`` after the optimizer step: on steps that are
   multiples of ``every`` it runs its own :func:`~initscope.probe.probe` pass on that batch at the
   current weights (model, ``.grad`` and buffers left as they were) and records it; on others it
   returns ``None`` at once. ``loss_fn(output, targets)``, or with ``targets=None`` and
   ``loss_fn=None`` the unit-variance noise loss of :func:`~initscope.probe.probe`.
2. In the step itself, at no extra forward or backward::

       with callback.watch(model, step):       # hooks on only when the step is due
           loss = loss_fn(model(x), y)
           loss.backward()
       optimizer.step()

   Statistics are taken from the training's own pass: gradients of its loss, weight gradients from
   ``.grad`` after ``backward``. The batch does not require grad, so the first layer has no
   ``input_grad``; residual adds (``layers="all"``) need the traced pass and are left out here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, TYPE_CHECKING

import torch
from torch import nn

from initscope.plan import InitPlan, plan_of
from initscope.probe.hooks import QUANTITIES, Recorder, Selection, check_quantities, select
from initscope.probe.probe import COLUMNS, Probe, build, plan_for_modes, probe, save_frame
from initscope.probe.sinks import Sink, as_sinks
from initscope.probe.summary import DEFAULT_BINS, DEFAULT_SAMPLE

if TYPE_CHECKING:  # pandas costs 0.8 s to import; only the functions that build frames need it
    import pandas as pd


class ProbeCallback:
    """Probe a model every ``every`` steps; write TensorBoard summaries and keep the rows.

    Args:
        every: record at steps ``0, every, 2·every, ...``.
        writer: where records go besides the table: ``None``, a TensorBoard log directory or
            ``SummaryWriter``, a :class:`~initscope.probe.sinks.Sink` (``WandbSink``), or a list of them.
        layers: as :func:`~initscope.probe.probe`'s ``layers``.
        quantities: which quantities to take (default all six).
        bins, quantiles, histograms, sample, seed: as for :func:`~initscope.probe.probe`.
        plan: predictions to set beside the measurements; default :func:`initscope.plan_of` ``(model)``.
            They describe the initial weights and, for gradients, a unit-variance output gradient: during
            training read the ratios as a drift from initialization, not as errors.
        tag: the TensorBoard tag prefix.

    TensorBoard: charts by quantity, layers together, with the predictions and the measured/predicted
    ratios, and the depth figure at every recorded step (see :mod:`initscope.probe.sinks`).
    """

    def __init__(self, every: int = 100, writer=None, layers: str | Sequence[str] = "weighted",
                 quantities: Sequence[str] = QUANTITIES, *, bins: int = DEFAULT_BINS, quantiles: bool = True,
                 histograms: bool = True, sample: int = DEFAULT_SAMPLE, seed: int = 0,
                 plan: InitPlan | None = None, tag: str = "probe") -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        check_quantities(quantities)
        self.every = every
        self.layers = layers
        self.quantities = tuple(quantities)
        self.options = dict(bins=bins, quantiles=quantiles, histograms=histograms, sample=sample, seed=seed)
        self.plan = plan
        self.tag = tag
        self._writer_arg = writer
        self._sinks: list[Sink] | None = None
        self._frames: list[pd.DataFrame] = []
        self._attached: tuple[int, Recorder, InitPlan | None] | None = None

    # -- when ---------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether ``step`` is one the callback records."""
        return step % self.every == 0

    # -- a separate probe pass ----------------------------------------------------------------------
    def __call__(self, step: int, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                 loss_fn: Callable | None = None) -> Probe | None:
        """On a due step, probe ``model`` on this batch and record it (returns the :class:`Probe`); else ``None``."""
        if not self.due(step):
            return None
        result = probe(model, inputs, targets, loss_fn=loss_fn, plan=self.plan, layers=self.layers,
                       quantities=self.quantities, **self.options)
        self.record(step, result)
        return result

    # -- inside the training step ---------------------------------------------------------------------
    def attach(self, model: nn.Module, step: int) -> bool:
        """On a due step, put hooks on ``model`` for the training's own forward and backward; returns whether it did."""
        if self._attached is not None:
            raise RuntimeError(f"attached already (step {self._attached[0]}): call collect() or detach() first")
        if not self.due(step):
            return False
        selection = select(model, self.layers)
        recorder = Recorder(model, Selection(selection.modules), quantities=self.quantities, **self.options)
        plan = self.plan if self.plan is not None else plan_of(model)
        if plan is not None:
            plan = plan_for_modes(model, plan)  # predictions for the modes the step runs in
        recorder.install()
        self._attached = (step, recorder, plan)
        return True

    def collect(self, step: int) -> Probe | None:
        """After ``loss.backward()``: take the weights and their ``.grad``, remove the hooks, record; ``None`` if not attached."""
        if self._attached is None:
            return None
        at, recorder, plan = self._attached
        if at != step:
            raise RuntimeError(f"attached at step {at}, collected at step {step}")
        try:
            weights = recorder.take_weights()
            recorder.take_weight_grads({name: w.grad for name, w in weights.items()})
        finally:
            self.detach()
        result = build(recorder, plan)
        self.record(step, result)
        return result

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` without recording (a step that failed)."""
        if self._attached is not None:
            self._attached[1].remove()
            self._attached = None

    def watch(self, model: nn.Module, step: int) -> "_Watch":
        """``with callback.watch(model, step): forward; backward`` — attach, then collect on a clean exit."""
        return _Watch(self, model, step)

    # -- recording ------------------------------------------------------------------------------------
    def record(self, step: int, result: Probe) -> None:
        """Append ``result``'s rows (with ``step``) to the table and write its TensorBoard summaries."""
        frame = result.to_frame()
        frame = frame[frame["quantity"].isin(self.quantities)]
        self._write(step, result, frame)
        frame.insert(0, "step", int(step))
        self._frames.append(frame.reset_index(drop=True))

    def frame(self) -> pd.DataFrame:
        """Every recorded row: the probe table's columns after a ``step`` column."""
        import pandas as pd

        if not self._frames:
            return pd.DataFrame(columns=["step", *COLUMNS])
        return pd.concat(self._frames, ignore_index=True)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`frame` as Parquet or CSV (by suffix)."""
        return save_frame(self.frame(), path)

    def sinks(self) -> list[Sink]:
        """Where records go besides the table (made on first use: a log directory opens a writer then)."""
        if self._sinks is None:
            self._sinks = as_sinks(self._writer_arg, self.tag)
        return self._sinks

    def _write(self, step: int, result: Probe, frame: pd.DataFrame) -> None:
        for sink in self.sinks():
            sink.write(step, result, frame)

    def close(self) -> None:
        """Remove any hooks and close what the callback's sinks opened."""
        self.detach()
        for sink in self._sinks or []:
            sink.close()
        self._sinks = None

    def __repr__(self) -> str:
        return f"ProbeCallback(every={self.every}, layers={self.layers!r}, recorded={len(self._frames)})"


class _Watch:
    def __init__(self, callback: ProbeCallback, model: nn.Module, step: int) -> None:
        self.callback, self.model, self.step = callback, model, step
        self.probe: Probe | None = None

    def __enter__(self) -> "_Watch":
        self.callback.attach(self.model, self.step)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.probe = self.callback.collect(self.step)
        else:
            self.callback.detach()
        return False


__all__ = ["ProbeCallback"]
