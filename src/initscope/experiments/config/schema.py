"""Settings described once: each field of a configuration dataclass carries its help text, its valid
values and its checks, and everything else (validation, the TOML checks, the command-line flags and
their help) is read from there.

A field is declared with :func:`setting`; its type is the dataclass annotation (``int``, ``float``,
``str``, ``X | None``, ``tuple[int, ...]``), its default the field's default. :class:`Schema` reads
them and does the three things every front end needs:

- :meth:`Schema.validate`: one value, checked and in its canonical type (a TOML ``1`` for a float
  becomes ``1.0``, a list becomes a tuple), or a :class:`~initscope.errors.ConfigError` that names the
  key and, for a name, lists the valid ones;
- :meth:`Schema.from_text`: a value written on the command line (``"30,60"`` for a tuple);
- :meth:`Schema.describe`: the help line, with the valid values as the registries list them now.

Why a dataclass with field metadata rather than pydantic: the configuration is a handful of scalars
whose checks are one line each, it needs no new dependency, and a frozen dataclass keeps its
``run_id`` hashing (``dataclasses.asdict``) exactly as it was, so existing results databases resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from initscope.errors import ConfigError

Choices = tuple[str, ...] | Callable[[], Iterable[str]]


@dataclass(frozen=True)
class Setting:
    """What a configuration field is, beyond its type and default.

    Attributes:
        help: one line for ``--help`` and the docs.
        choices: the valid names (a tuple, or a function returning them so that a registry is read
            when asked, not when imported); a value outside is refused with the list.
        check: ``check(value)`` raises :class:`ConfigError` (its message naming the key) for a value
            no simple rule describes: a data source's spec, a model name, a device.
        listing: the valid values as the help shows them, for fields with a ``check`` (a function).
        minimum, above: ``value >= minimum``, ``value > above`` (for tuples, every element).
        flags: the ``initscope train`` flags (default: ``--field-name``).
        sweep_flag: the ``initscope sweep`` flag of a grid axis, a comma-separated list (``--methods``).
        aliases: other names a sweep file accepts for the key (``methods`` for ``method``).
        in_id_at_default: False for a field added after results databases existed: at its default it is
            left out of the ``run_id`` hash, so that every run made before the field existed keeps its id
            (and its database resumes); set to anything else, it is in the hash like every field.
    """

    help: str
    choices: Choices | None = None
    check: Callable[[Any], None] | None = None
    listing: Callable[[], Iterable[str]] | None = None
    minimum: float | None = None
    above: float | None = None
    flags: tuple[str, ...] = ()
    sweep_flag: str | None = None
    aliases: tuple[str, ...] = ()
    in_id_at_default: bool = True


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its :class:`Setting` (keyword arguments as there)."""
    return field(default=default, metadata={"setting": Setting(help, **kw)})


def _valid(choices: Choices | Callable[[], Iterable[str]]) -> tuple[str, ...]:
    return tuple(choices() if callable(choices) else choices)


@dataclass(frozen=True)
class _Type:
    """A field's annotation taken apart: the base type, whether None is allowed, whether it is a tuple."""

    base: type
    optional: bool
    sequence: bool


def _read_type(annotation: Any) -> _Type:
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        (annotation,) = args
    if typing.get_origin(annotation) is tuple:
        return _Type(typing.get_args(annotation)[0], optional, True)
    return _Type(annotation, optional, False)


def _fmt(x: float) -> str:
    return f"{x:g}"


class Schema:
    """The settings of one configuration dataclass (its fields declared with :func:`setting`)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        hints = typing.get_type_hints(cls)
        self.fields = {f.name: f for f in dataclasses.fields(cls)}
        self.types = {name: _read_type(hints[name]) for name in self.fields}

    def names(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def setting(self, name: str) -> Setting:
        return self.fields[name].metadata["setting"]

    def default(self, name: str) -> Any:
        return self.fields[name].default

    def type_of(self, name: str) -> _Type:
        return self.types[name]

    # -- checking ------------------------------------------------------------------------------------

    def check_keys(self, keys: Iterable[str], where: str) -> None:
        """Refuse keys that are no field, naming them and listing the fields."""
        unknown = sorted(set(keys) - set(self.fields))
        if unknown:
            raise ConfigError(f"unknown {where} key(s) {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(self.fields)}")

    def validate(self, name: str, value: Any) -> Any:
        """``value`` checked for field ``name`` and returned in the field's canonical type."""
        t, s = self.types[name], self.setting(name)
        if value is None:
            if t.optional:
                return None
            raise ConfigError(f"{name}: needs a value")
        if t.sequence:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name}: {value!r} is not a list of {t.base.__name__} values")
            value = tuple(self._scalar(name, v, t.base) for v in value)
            items = value
        else:
            value = self._scalar(name, value, t.base)
            items = (value,)
        for v in items:
            if s.above is not None and not v > s.above:
                raise ConfigError(f"{name}: {v!r} must be > {_fmt(s.above)}")
            if s.minimum is not None and v < s.minimum:
                raise ConfigError(f"{name}: {v!r} must be >= {_fmt(s.minimum)}")
        if s.choices is not None:
            valid = _valid(s.choices)
            if value not in valid:
                raise ConfigError(f"{name}: unknown value {value!r}; valid: {', '.join(valid)}")
        if s.check is not None:
            s.check(value)
        return value

    @staticmethod
    def _scalar(name: str, value: Any, base: type) -> Any:
        if base is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: {value!r} is not true or false")
            return value
        if base is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: {value!r} is not an integer")
            return int(value)
        if base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}: {value!r} is not a number")
            if not math.isfinite(value):
                raise ConfigError(f"{name}: {value!r} is not a finite number")
            return float(value)
        if base is str:
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if not isinstance(value, str):
                raise ConfigError(f"{name}: {value!r} is not a string")
            return value
        raise TypeError(f"{name}: no rule for fields of type {base!r}")  # a schema bug, not the user's

    def from_text(self, name: str, text: str) -> Any:
        """A value as written on the command line, checked (a tuple as ``30,60``)."""
        t = self.types[name]
        if t.sequence:
            parts = [p.strip() for p in str(text).split(",") if p.strip()]
            value: Any = [self._parse(name, p, t.base, whole=text) for p in parts]
        else:
            value = self._parse(name, str(text).strip(), t.base)
        return self.validate(name, value)

    @staticmethod
    def _parse(name: str, text: str, base: type, whole: str | None = None) -> Any:
        if base is bool:
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if text.lower() not in words:
                raise ConfigError(f"{name}: {text!r} is not true or false")
            return words[text.lower()]
        try:
            return base(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(base, f"a {base.__name__}")
            if whole is not None:
                raise ConfigError(f"{name}: {whole!r} is not a list of integers: write it like 30,60") from None
            raise ConfigError(f"{name}: {text!r} is not {kind}") from None

    # -- describing ----------------------------------------------------------------------------------

    def valid_values(self, name: str) -> tuple[str, ...]:
        """The values the help lists for ``name`` (empty for a number)."""
        s = self.setting(name)
        if s.choices is not None:
            return _valid(s.choices)
        if s.listing is not None:
            return _valid(s.listing)
        return ()

    def describe(self, name: str) -> str:
        """The help line of ``name``: its help text, then the valid values where it has a list."""
        valid = self.valid_values(name)
        text = self.setting(name).help
        return f"{text}; one of: {', '.join(valid)}" if valid else text

    def flags(self, name: str) -> tuple[str, ...]:
        return self.setting(name).flags or ("--" + name.replace("_", "-"),)
