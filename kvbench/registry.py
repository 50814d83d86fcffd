"""Name -> object registries with aliases and "did you mean ...?" errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from kvbench.errors import InputError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: list[str]) -> InputError:
    return InputError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; known: {', '.join(sorted(choices))}")


class Registry(Generic[T]):
    """A mapping from names (and aliases) to entries, keeping insertion order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T, aliases: tuple[str, ...] = ()) -> T:
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry and its aliases (a plugin registered again replaces itself)."""
        key = self.canonical(name)
        del self._entries[key]
        self._aliases = {alias: target for alias, target in self._aliases.items() if target != key}

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        raise unknown(self.kind, name, list(self._entries) + list(self._aliases))

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def names(self) -> list[str]:
        return list(self._entries)

    def aliases(self, name: str) -> list[str]:
        """The other names of a registered entry, in registration order."""
        canonical = self.canonical(name)
        return [alias for alias, target in self._aliases.items() if target == canonical]
