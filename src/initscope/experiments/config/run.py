"""One training run's configuration: every field with its type, default, valid values and help, here.

:class:`RunConfig` is the whole configuration of a run (nanoGPT's one dict): saved with every
checkpoint and result, hashed into its ``run_id``, and checked when it is made, so a RunConfig that
exists is one that can run. ``initscope train``'s flags, ``initscope sweep``'s flags and the keys a
sweep file may set are all read from :data:`RUN_SCHEMA` (see :mod:`.schema`).

``run_id`` is the first 12 hex digits of the SHA-256 of the JSON of every field but ``device``
(sorted keys, canonical types): the same settings give the same id on every machine and in every
release that keeps these fields, so a results database written earlier resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from initscope.errors import ConfigError
from initscope.experiments.config.schema import Schema, setting

# Fields that do not change what a run computes, left out of its run_id.
NOT_IN_ID = ("device",)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


# -- the valid values, read from their registries when asked ----------------------------------------------


def _methods() -> tuple[str, ...]:
    from initscope.methods import METHODS

    return tuple(METHODS)


def _optimizers() -> tuple[str, ...]:
    from initscope.experiments.training.optim import OPTIMIZERS

    return OPTIMIZERS


def _schedules() -> tuple[str, ...]:
    from initscope.experiments.training.optim import SCHEDULES

    return SCHEDULES


def _normalizations() -> tuple[str, ...]:
    from initscope.experiments.data import NORMALIZATIONS

    return NORMALIZATIONS


def _norms() -> tuple[str, ...]:
    from initscope.models.zoo import NORMS

    return NORMS


def _heads() -> tuple[str, ...]:
    from initscope.models.zoo import HEADS

    return HEADS


def _sources() -> tuple[str, ...]:
    from initscope.experiments.data import source_usages

    return source_usages()


def _check_data(value: str) -> None:
    from initscope.experiments.data import parse_data

    parse_data(value)  # the one place a data spec is read; raises ConfigError naming the valid sources


@functools.lru_cache(maxsize=1)
def _torchvision_models() -> frozenset[str]:
    try:
        import torchvision

        return frozenset(torchvision.models.list_models())
    except (ImportError, AttributeError):
        return frozenset()


def _check_model(value: str) -> None:
    if ":" in value:  # module:callable, imported when the run starts
        return
    from initscope import models

    own = list(models.list_models())
    if value in own or value in _torchvision_models():
        return
    raise ConfigError(f"model: unknown model {value!r}; valid: {', '.join(own)}, any torchvision "
                      "classification model name, or module:callable")


def _check_device(value: str) -> None:
    """A device a run can train on: auto, cpu, cuda, cuda:N, mps. torch knows more (meta, xla, ...), on which
    the loop cannot train; whether this machine has the GPU is the engine's check (a Ray cluster may)."""
    kind, colon, index = value.partition(":")
    if value in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and colon and index.isdigit()):
        return
    raise ConfigError(f"device: unknown value {value!r}; valid: {', '.join(DEVICES)}")


# -- the configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run; saved with every checkpoint and result.

    Every value is checked when the config is made (:class:`~initscope.errors.ConfigError` naming the
    key and the valid values); numbers are stored in their canonical types, so ``lr=1`` and ``lr=1.0``
    are one run.

    Examples:
        >>> RunConfig(data="synthetic", width=4, epochs=1).run_id  # doctest: +SKIP
        '5a0c9d2f1b7e'
    """

    data: str = setting("digits", "the data source", check=_check_data, listing=_sources,
                        aliases=("datasets", "dataset"), sweep_flag="--data")
    data_root: str | None = setting(None, "where the torchvision sets and relative folder: paths lie (default ./data)")
    model: str = setting("plain34", "initscope's models (`initscope.models.list_models()`), any torchvision "
                         "classification model, or module:callable", check=_check_model, flags=("--model", "-m"),
                         aliases=("models",), sweep_flag="--model")
    width: int = setting(16, "stem channels of initscope's models (64 = the papers' plain34/ResNet; 32 = MobileNet 1.0)",
                         minimum=1)
    norm: str = setting("default", "default keeps the model's normalization, none removes it", choices=_norms)
    head: str = setting("default", "paper: a 256-unit linear + BatchNorm + ReLU before the classifier",
                        choices=_heads)
    method: str = setting("kaiming-forward", "the initialization (see `initscope methods`)", choices=_methods,
                          aliases=("methods",), sweep_flag="--methods")
    optimizer: str = setting("adam", "the optimizer", choices=_optimizers, aliases=("optimizers",),
                             sweep_flag="--optimizers")
    lr: float = setting(1e-3, "the learning rate", above=0, aliases=("lrs", "learning_rates"), sweep_flag="--lrs")
    schedule: str = setting("constant", "the learning-rate schedule", choices=_schedules)
    step_epochs: tuple[int, ...] = setting((), "epochs where the step schedule decays, e.g. 30,60", minimum=0)
    step_gamma: float = setting(0.1, "the step schedule's factor", minimum=0)
    epochs: int = setting(5, "training epochs", minimum=1)
    batch_size: int = setting(64, "images per step (per rank under torchrun)", minimum=1)
    seed: int = setting(0, "seeds the model, the initialization, the split and the shuffling", minimum=0,
                        aliases=("seeds",), sweep_flag="--seeds")
    image_size: int | None = setting(None, "resize images to this square size (default: the source's own)",
                                     minimum=1)
    normalize: str = setting("minus-one-one", "pixel normalization", choices=_normalizations)
    weight_decay: float = setting(0.0, "the optimizer's weight decay", minimum=0)
    limit: int | None = setting(None, "use this many train images (stratified; default: all)", minimum=1)
    device: str = setting("auto", "auto is CUDA where there is a GPU, else the CPU", check=_check_device,
                          listing=lambda: DEVICES)
    probe_every: int = setting(0, "probe every layer every N training steps (0: off)", minimum=0)

    def __post_init__(self) -> None:
        for name in RUN_SCHEMA.names():
            # frozen: the canonical value goes in the way dataclasses' own __init__ put the given one
            object.__setattr__(self, name, RUN_SCHEMA.validate(name, getattr(self, name)))

    @property
    def run_id(self) -> str:
        """A stable 12-hex-digit hash of the fields that define the result (all but ``device``)."""
        d = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_ID}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["step_epochs"] = list(self.step_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A RunConfig from a dict; unknown keys are refused by name, with the valid ones listed."""
        RUN_SCHEMA.check_keys(d, "RunConfig")
        return cls(**d)


RUN_SCHEMA = Schema(RunConfig)
