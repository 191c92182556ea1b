"""A registry of named extensions: methods, data sources, engines.

Every extension point of initscope has the shape of the rule registry: ``register`` refuses a name
given twice (unless ``overwrite=True``), a lookup of an unknown name is a ``ValueError`` that lists
the valid ones, and listings (``initscope methods``, the CLI's help, sweep validation) read the
registry, so a new entry is one file with one decorator.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"method"``, ``"data source"``).

    Examples:
        >>> engines = Registry("engine")
        >>> @engines.register("local")
        ... def run_locally(sweep): ...
        >>> engines.get("local") is run_locally
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        # Bumped on every change, so that anything remembered under other entries can notice.
        self.version = 0

    def add(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        """Register ``entry`` under ``name``; a name already taken raises unless ``overwrite``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = entry
        self.version += 1
        return entry

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(entry: T) -> T:
            return self.add(name, entry, overwrite=overwrite)

        return decorate

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests, and for replacing an entry by hand); unknown names are ignored."""
        if self._entries.pop(name, None) is not None:
            self.version += 1

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name raises a ``ValueError`` listing the valid ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind}={name!r} is not one of {tuple(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
