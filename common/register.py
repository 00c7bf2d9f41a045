"""Flat name -> class registries for models, runners, optimizers, schedulers and datasets.

Registration is explicit: each package's ``__init__`` imports its modules, and each
module decorates its classes with ``@MODELS.register("NAME")``. Importing ``main``
therefore fills every registry and runs nothing else.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate registry name; the message says what is known."""

    def __str__(self) -> str:  # KeyError quotes its message; a plain line reads better.
        return str(self.args[0]) if self.args else ""


class Registry:
    """A named map from string keys to callables (classes or factory functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated callable under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise RegistryError(
                    f"{self.kind} '{name}' is already registered (by {self._items[name].__module__}."
                    f"{getattr(self._items[name], '__qualname__', self._items[name])}); names must be unique"
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable:
        """The callable registered under ``name``; an unknown name lists the known ones."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "(none)"
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RegistryError(f"unknown {self.kind} '{name}'; known: {known}{hint}") from None

    def names(self) -> List[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@dataclass(frozen=True)
class NestedBlock:
    """Marks a constructor argument as a nested ``{name: ..., **kwargs}`` block of
    ``registry``, e.g. ``base: Annotated[Dict[str, Any], NestedBlock(MODELS, (...))]``
    for a model that wraps a model. The config checker validates such a block like a
    top-level one (dotted path ``model.base.key``); ``injected`` are the arguments the
    wrapping class passes itself, which the block may not set."""

    registry: Registry
    injected: Tuple[str, ...] = ()


MODELS = Registry("model")
RUNNERS = Registry("runner")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
DATASETS = Registry("dataset")
