"""A tiny name → factory registry, in the manner of timm's ``register_model``.

Why: backbones, classifiers and (later) training architectures are chosen by
name on the command line. A registry keeps the CLI free of if/elif ladders and
lets a plugin add an entry with one decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Named factories of one kind, each with a one-line description."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: add ``fn`` under ``name`` (default: the function's name)."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def list(self) -> list[str]:
        return sorted(self._entries)

    def describe(self, name: str) -> str:
        """First line of the factory's docstring: what ``models list`` prints."""
        doc = (self.get(name).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __contains__(self, name: object) -> bool:
        return name in self._entries
