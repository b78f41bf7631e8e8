"""What the method registries share: a package whose modules register themselves, looked up by name."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")


def import_all(package: str, path) -> None:
    """Import every module of a package (`__name__`, `__path__`): each registers itself on import,
    so a new method is one new file."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


def lookup(registry: dict[str, T], name: str, what: str) -> T:
    """registry[name], or a ConfigError naming the nearest entry and listing them all."""
    if name not in registry:
        near = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown {what} {name!r}{hint} Available: {', '.join(sorted(registry))}")
    return registry[name]
