"""Data sources: what a source is, the registry of them, and the one place a data spec is read.

A run names its data with one string: ``digits``, or ``folder:PATH`` for a source that takes an
argument. :func:`parse_data` reads that string (and nothing else does): it finds the source in
:data:`SOURCES` and has the source turn its argument into a typed value (a folder's ``Path``).
A source then knows three things, as methods of :class:`DataSource`:

- :meth:`~DataSource.check`, before any run starts: are its files where they should be;
- :meth:`~DataSource.load`: its images in [0, 1] and their labels (an :class:`Images`);
- its ``summary``, one line for the command line's help, which lists the sources from this registry.

Splitting, normalizing and checking the images is the same for every source
(:mod:`initscope.experiments.data.splits`). A new source is one file::

    from initscope.experiments.data import DataSource, Images, register_source

    @register_source("stripes")
    class Stripes(DataSource):
        summary = "horizontal against vertical stripes, 8x8"

        def load(self, arg, *, root, image_size, in_channels, progress):
            ...
            return Images(x, y, ["horizontal", "vertical"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from initscope.errors import ConfigError
from initscope.registry import Registry


@dataclass
class Images:
    """What a source loads: images in [0, 1] and their labels, before any split.

    Attributes:
        x: images (N, C, H, W): float pixel values in [0, 1], or uint8 values 0..255 (decoded files).
        y: int64 labels (N,), ``0 <= y < len(class_names)``.
        class_names: one name per class.
        test: an official test split ``(x, y)`` to keep as it is; None splits ``x`` three ways.
        files: for sources of files, the path (relative to the source's root) of each image of ``x``.
        skipped: files that could not be decoded and were left out.
        rows: for a source that decoded only some of its images (:meth:`DataSource.load` with ``rows``):
            which of ``y`` the rows of ``x`` are, and which of the test split's labels the rows of its
            images are. ``y`` and the test labels then hold every image's label, decoded or not.
        test_files: the official test split's files, as ``files``.
    """

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: tuple[list[int], list[int]] | None = None
    test_files: list[str] = field(default_factory=list)


class DataSource:
    """A family of images a run can train on, registered by name with :func:`register_source`.

    Attributes:
        name: the registered name (set by :func:`register_source`).
        summary: one line for ``--help``.
        argument: the name of its argument (``"PATH"``) when the source is written ``name:ARG``; None
            for a source without one.
        converts_channels: the source can give 1-channel or 3-channel images (``in_channels``).
    """

    name: str = ""
    summary: str = ""
    argument: str | None = None
    converts_channels: bool = False

    @property
    def usage(self) -> str:
        """How the source is written: ``digits``, ``folder:PATH``."""
        return self.name if self.argument is None else f"{self.name}:{self.argument}"

    def parse(self, arg: str) -> Any:
        """The typed value of the argument written after ``name:`` (sources with an ``argument``)."""
        return arg

    def check(self, arg: Any, root: str | Path | None) -> None:
        """Raise (``FileNotFoundError`` naming what was looked for) when the source cannot be loaded from
        ``root``; called before any run starts. Nothing to check by default."""

    def load(self, arg: Any, *, root: str | Path | None, image_size: int | tuple[int, int] | None,
             in_channels: int | None, progress: bool) -> Images:
        """The source's images in [0, 1] and labels.

        Args:
            arg: the parsed argument (None for a source without one).
            root: where the user keeps data (``--data-root``), or None.
            image_size: resize to this (H, W) or square size; None keeps the source's own size.
            in_channels: 1 or 3 for a source that ``converts_channels``; None for its default.
            progress: show a bar during slow loading.

        A source whose :meth:`labels` gives its labels also takes ``rows=(pool, test)``: decode only those
        images (indices into its labels and its official test split's), and say which in ``Images.rows``.
        """
        raise NotImplementedError(f"data source {self.name!r} does not implement load()")

    def labels(self, arg: Any, *, root: str | Path | None, image_size: int | tuple[int, int] | None,
               in_channels: int | None) -> Images | None:
        """The labels (and files) without the pixels, ``x`` empty, for a source that can decode only the images
        a run uses (``--limit``, ``eval_limit``): :meth:`load` then takes ``rows``. None (the default): the
        source loads everything, or has everything decoded already."""
        return None


SOURCES: Registry[DataSource] = Registry("data source")

def register_source(name: str, *, overwrite: bool = False) -> Callable[[Any], Any]:
    """Register a :class:`DataSource` (a subclass, instantiated without arguments, or an instance) under
    ``name``; a name taken already raises ``ValueError`` unless ``overwrite``.

    Examples:
        >>> @register_source("stripes")  # doctest: +SKIP
        ... class Stripes(DataSource):
        ...     summary = "horizontal against vertical stripes"
        ...     def load(self, arg, **kw): ...
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a data source needs a non-empty name without ':', got {name!r}")

    def decorate(source: Any) -> Any:
        instance = source() if isinstance(source, type) else source
        if not isinstance(instance, DataSource):
            raise TypeError(f"register_source({name!r}): {source!r} is not a DataSource")
        SOURCES.add(name, instance, overwrite=overwrite)  # a duplicate is refused before anything changes
        instance.name = name
        return source

    return decorate


def source_usages() -> tuple[str, ...]:
    """Every registered source as it is written (``digits``, ..., ``folder:PATH``), in registration order."""
    return tuple(s.usage for s in SOURCES.values())


@dataclass(frozen=True)
class DataRef:
    """A data spec, read: the source, the string as written, and the source's parsed argument."""

    source: DataSource
    text: str
    arg: Any = None

    def check(self, root: str | Path | None = None) -> None:
        """The source's check before any run (files present)."""
        self.source.check(self.arg, root)


def parse_data(text: str) -> DataRef:
    """Read a data spec (``digits``, ``folder:PATH``): the one place such a string is taken apart.

    Raises:
        ConfigError: an unknown source (listing the registered ones), an argument to a source that takes
            none, or a missing argument.
    """
    valid = ", ".join(source_usages())
    if not isinstance(text, str) or not text:
        raise ConfigError(f"data: {text!r} is not a data source; valid: {valid}")
    name, sep, arg = text.partition(":")
    if name not in SOURCES:
        raise ConfigError(f"data: unknown value {text!r}; valid: {valid}")
    source = SOURCES[name]
    if source.argument is None:
        if sep:
            raise ConfigError(f"data: {name} takes no argument, got {text!r}")
        return DataRef(source, text)
    if not arg:
        raise ConfigError(f"data: {name} needs its argument, written {source.usage}")
    return DataRef(source, text, source.parse(arg))
