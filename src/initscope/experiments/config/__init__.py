"""What a run and a sweep are: :class:`RunConfig` (every field described once, in :data:`RUN_SCHEMA`)
and :class:`SweepConfig` (a grid of RunConfigs, from TOML or flags)."""

from initscope.experiments.config.run import RUN_SCHEMA, RunConfig
from initscope.experiments.config.schema import Schema, Setting, setting
from initscope.experiments.config.sweep import AXES, PAPER_METHODS, SweepConfig, load_toml

__all__ = ["AXES", "PAPER_METHODS", "RUN_SCHEMA", "RunConfig", "Schema", "Setting", "SweepConfig", "load_toml",
           "setting"]
