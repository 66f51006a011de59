"""One registry class for everything looked up by name (methods, tasks, metrics, adapters) or by type (backbone
families): registering a key twice is an error unless the caller says it replaces the entry on purpose, and an
unknown key gets an error that lists the known ones.

An entry may be registered by where it lives, ``"package.module:attribute"`` (`Lazy`): its module is imported the
first time the entry is used, so listing the names (``hificl --help``) imports nothing."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Lazy:
    """An entry named by where it lives: ``"package.module:attribute"``."""

    path: str

    def load(self) -> Any:
        module, _, attribute = self.path.partition(":")
        return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Entries of one `kind` ("method", "task", ...) by key."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[Hashable, T] = {}

    def register(self, key: Hashable, entry: T | None = None, *, replace: bool = False) -> Any:
        """Add `entry` under `key` (used bare, as a decorator: ``@registry.register("name")``). A key already
        registered raises ValueError unless `replace` is true."""
        if entry is None:
            def decorator(value: T) -> T:
                self.register(key, value, replace=replace)
                return value
            return decorator
        if key in self._entries and not replace and not (self._entries[key] is entry or self._entries[key] == entry):
            raise ValueError(f"A {self.kind} {self._name(key)} is already registered ({self._entries[key]!r}); "
                             f"pick another name, or pass replace=True to replace it on purpose.")
        self._entries[key] = entry
        return entry

    def get(self, key: Hashable) -> T:
        try:
            entry = self._entries[key]
        except (KeyError, TypeError):
            raise ValueError(f"Unknown {self.kind} {self._name(key)}; known {self.kind}s: "
                             f"{', '.join(self.names())}.") from None
        if isinstance(entry, Lazy):
            entry = self._entries[key] = entry.load()
        return entry

    def find(self, match: Callable[[Hashable], bool]) -> T | None:
        """The entry of the first key (in registration order, latest first) for which `match` holds."""
        for key in reversed(list(self._entries)):
            if match(key):
                return self.get(key)
        return None

    def unregister(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return sorted(k.__name__ if isinstance(k, type) else str(k) for k in self._entries)

    def items(self) -> list[tuple[Hashable, T]]:
        """Every key and its entry (lazy entries loaded)."""
        return [(key, self.get(key)) for key in list(self._entries)]

    @staticmethod
    def _name(key: Hashable) -> str:
        return key.__name__ if isinstance(key, type) else repr(key)
