"""The training loop and what it uses: optimizers and schedules, metrics, atomic checkpoints, and
data-parallel training under torchrun. :func:`train` runs one :class:`~initscope.experiments.config.RunConfig`."""

from initscope.experiments.training.loop import RunResult, build_model, predict, resolve_device, train

__all__ = ["RunResult", "build_model", "predict", "resolve_device", "train"]
