"""PyTorch Lightning: the probe as a ``Callback`` (``pip install 'initscope[lightning]'``).

``trainer = L.Trainer(callbacks=[InitscopeCallback(every=100)], logger=...)``: on every ``every``-th
training step (and step 0, the initialization) the callback takes the statistics of the step's own
forward and backward pass (no extra pass: :meth:`ProbeCallback.attach` before the batch,
:meth:`ProbeCallback.collect` after the backward), sets the plan's predictions beside them, and sends
them to the trainer's loggers: a ``TensorBoardLogger`` gets :class:`~initscope.probe.sinks.TensorBoardSink`,
a ``WandbLogger`` gets :class:`~initscope.probe.sinks.WandbSink`. ``callback.frame()`` holds every row.

The probed network is the submodule a plan was applied to (``initscope.init_(self.net, ...)`` in the
LightningModule), so that the layers' names are the plan's; without one, the LightningModule itself.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the extra is not installed
    raise ImportError("the Lightning callback needs Lightning: pip install 'initscope[lightning]'") from None

from initscope.plan import plan_of
from initscope.probe.callback import ProbeCallback
from initscope.probe.hooks import QUANTITIES
from initscope.probe.sinks import Sink, TensorBoardSink, WandbSink


def _sinks_of(loggers: Sequence[Any], tag: str) -> list[Sink]:
    sinks: list[Sink] = []
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            sinks.append(TensorBoardSink(logger.experiment, tag=tag))
        elif kind == "WandbLogger":
            sinks.append(WandbSink(logger.experiment, prefix=tag))
    return sinks


def _probed(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if plan_of(sub) is not None:
            return sub
    return module


class InitscopeCallback(pl.Callback):
    """Probe every ``every`` training steps; statistics and predictions to the trainer's loggers.

    Args:
        every: record at global steps ``0, every, 2·every, ...``.
        layers, quantities: as :class:`~initscope.probe.ProbeCallback`.
        sinks: where to send records; default the trainer's TensorBoard and W&B loggers.
        tag: the chart prefix.
        **options: the probe's ``bins``, ``quantiles``, ``histograms``, ``sample``, ``seed``.
    """

    def __init__(self, every: int = 100, layers: str | Sequence[str] = "weighted",
                 quantities: Sequence[str] = QUANTITIES, sinks: Sequence[Sink] | None = None, tag: str = "probe",
                 **options: Any) -> None:
        super().__init__()
        self.every, self.layers, self.quantities, self.tag = every, layers, tuple(quantities), tag
        self._sinks, self._options = sinks, options
        self.probe: ProbeCallback | None = None
        self._model: nn.Module | None = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        sinks = list(self._sinks) if self._sinks is not None else _sinks_of(trainer.loggers, self.tag)
        self.probe = ProbeCallback(every=self.every, writer=sinks, layers=self.layers, quantities=self.quantities,
                                   tag=self.tag, **self._options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._model = _probed(pl_module)
        # Hooks on for this step's own forward and backward (only on due steps).
        self.probe.attach(self._model, trainer.global_step)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.probe.collect(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.probe.detach()  # a step that skipped its backward (manual optimization) leaves no hooks behind

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.probe is not None:
            self.probe.close()

    def frame(self):
        """Every recorded row, as :meth:`ProbeCallback.frame`."""
        return self.probe.frame()
