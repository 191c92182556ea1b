"""One training run's configuration: every field with its type, default, valid values and help, here.

:class:`RunConfig` is the whole configuration of a run (nanoGPT's one dict): saved with every
checkpoint and result, hashed into its ``run_id``, and checked when it is made, so a RunConfig that
exists is one that can run. ``initscope train``'s flags, ``initscope sweep``'s flags and the keys a
sweep file may set are all read from :data:`RUN_SCHEMA` (see :mod:`.schema`).

``run_id`` is the first 12 hex digits of the SHA-256 of the JSON of every field but ``device`` and
``workers`` (sorted keys, canonical types): the same settings give the same id on every machine and in
every release that keeps these fields, so a results database written earlier resumes. A field added
later (``augment``, ``patience``, ...) is left out of the hash while it holds its default
(``in_id_at_default=False``), so the runs made before it existed keep their ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from initscope.errors import ConfigError
from initscope.experiments.config.schema import Schema, setting

# Fields that do not change what a run computes, left out of its run_id.
NOT_IN_ID = ("device", "workers")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


# -- the valid values, read from their registries when asked ----------------------------------------------


def _read(module: str, name: str) -> Callable[[], tuple[str, ...]]:
    """The valid values of a field, read from ``module.name`` when asked, not when this module is imported (a
    registry may grow meanwhile, and importing it here would import the world)."""

    def values() -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(module), name))

    return values


_methods = _read("initscope.methods", "METHODS")
_optimizers = _read("initscope.experiments.training.optim", "OPTIMIZERS")
_schedules = _read("initscope.experiments.training.optim", "SCHEDULES")
_normalizations = _read("initscope.experiments.data", "NORMALIZATIONS")
_norms = _read("initscope.models.zoo", "NORMS")
_heads = _read("initscope.models.zoo", "HEADS")
_augmentations = _read("initscope.experiments.training.augment", "AUGMENTATIONS")
_distributions = _read("initscope.sampling", "DISTRIBUTIONS")
_residual_policies = _read("initscope.options", "POLICIES")


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


def model_takes(model: str, keyword: str) -> bool:
    """Whether initscope's registered model ``model`` takes the keyword argument ``keyword``."""
    import inspect

    from initscope import models

    if not models.is_registered(model):
        return False
    return keyword in inspect.signature(models._REGISTRY[model]).parameters


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
    # -- added for the papers' regime (issue 15); at their defaults they are not in the run_id --
    augment: str = setting("none", "training-time augmentation, drawn per batch: flip (horizontal), crop-flip (random "
                           "crop of the image padded by 1/8 of its side, by reflection, and flip), resized-crop-flip "
                           "(random 35-100% of the area at aspect 3/4-4/3, resized back, and flip)",
                           choices=_augmentations, in_id_at_default=False)
    patience: int = setting(0, "early stopping: stop after this many epochs without a better validation accuracy "
                            "(0: train every epoch)", minimum=0, in_id_at_default=False)
    min_epochs: int = setting(0, "early stopping never stops a run before this epoch", minimum=0,
                              in_id_at_default=False)
    distribution: str | None = setting(None, "the law the initialization draws from (default: the method's own; the "
                                       "Glorot/He paper drew uniform); methods that draw their own way (orthogonal, "
                                       "lsuv) keep theirs", choices=_distributions,
                                       in_id_at_default=False)
    residual: str | None = setting(None, "the residual policy of the plan (initscope.methods.residual; default: "
                                   "the method's own)", choices=_residual_policies, in_id_at_default=False)
    fixup_scalars: bool = setting(False, "build Fixup's scalar biases and multipliers into the model (the CIFAR "
                                  "ResNets resnet20/56/110)", in_id_at_default=False)
    eval_limit: int | None = setting(None, "score validation and test on this many images each (stratified, seeded; "
                                     "default: all)", minimum=1, in_id_at_default=False)
    test_at: tuple[int, ...] = setting((), "epochs after which the current weights are also scored on the test split "
                                       "(e.g. 1,5), stored with the epoch", minimum=1, in_id_at_default=False)
    workers: int = setting(0, "processes preparing augmented batches beside the training step (0: in the training "
                           "process; not in the run_id)", minimum=0, in_id_at_default=False)

    def __post_init__(self) -> None:
        for name in RUN_SCHEMA.names():
            # frozen: the canonical value goes in the way dataclasses' own __init__ put the given one
            object.__setattr__(self, name, RUN_SCHEMA.validate(name, getattr(self, name)))
        if self.fixup_scalars and not model_takes(self.model, "fixup_scalars"):
            raise ConfigError(f"fixup_scalars: model {self.model!r} has no Fixup scalars to build; the models that do: "
                              "resnet20, resnet56, resnet110")

    @property
    def run_id(self) -> str:
        """A stable 12-hex-digit hash of the fields that define the result (all but ``device`` and ``workers``)."""
        return hashlib.sha256(json.dumps(self.id_fields(), sort_keys=True).encode()).hexdigest()[:12]

    def id_fields(self) -> dict[str, Any]:
        """The fields the ``run_id`` hashes: every field but those of :data:`NOT_IN_ID`, and the fields added
        later only where they are not at their default."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IN_ID
                and (RUN_SCHEMA.setting(k).in_id_at_default or v != _default_json(k))}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        for name in RUN_SCHEMA.names():
            if RUN_SCHEMA.type_of(name).sequence:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A RunConfig from a dict; unknown keys are refused by name, with the valid ones listed."""
        RUN_SCHEMA.check_keys(d, "RunConfig")
        return cls(**d)


RUN_SCHEMA = Schema(RunConfig)
# A field's other spellings in a sweep's [grid] and [select] ("lr" for the learning rate), to its name.
ALIASES = {alias: name for name in RUN_SCHEMA.names() for alias in RUN_SCHEMA.setting(name).aliases}


def _default_json(name: str) -> Any:
    value = RUN_SCHEMA.default(name)
    return list(value) if isinstance(value, tuple) else value
