"""Plugins registered by name: models, training modes, exporters, bench backends.

One helper so every family behaves the same way: a second plugin under a taken name is a
programming error raised at import (not a silent overwrite), names list in registration order,
and an unknown name fails with the choices in the message. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedge.errors import UsageError

T = TypeVar("T")


class UnknownNameError(UsageError):
    """A name that no plugin of the family registered (a typo in --format, --mode, --arch, ...)."""


class Registry(Generic[T]):
    """Name -> plugin (a class or a builder function). `kind` names the family in messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@MODELS.register("cnn")`. Refuses a name that is already taken."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {_label(self._items[name])}")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of {', '.join(sorted(self._items))}") from None

    def names(self) -> tuple[str, ...]:
        """In registration order (the order plugins are documented and run in)."""
        return tuple(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(tuple(self._items.items()))

    def values(self) -> Iterator[T]:
        return iter(tuple(self._items.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _label(item: object) -> str:
    return getattr(item, "__qualname__", repr(item))
