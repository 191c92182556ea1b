"""What runs a sweep: a registry of engines (:data:`ENGINES`; :func:`register_engine` adds one), all with
one signature and one :class:`SweepSummary`. ``local`` runs one run after another here; ``ray`` makes
each run a Ray task."""

from initscope.experiments.engines.base import (ENGINES, Engine, EngineOption, SweepSummary, engine_options,
                                                register_engine)
from initscope.experiments.engines.local import run_sweep
from initscope.experiments.engines.ray import run_sweep_ray

__all__ = ["ENGINES", "Engine", "EngineOption", "SweepSummary", "engine_options", "register_engine", "run_sweep",
           "run_sweep_ray"]
