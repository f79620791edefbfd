"""The method registry: ``delta_type`` → the class that implements it.

Built-in methods are listed by module name and imported on first use, so the registry imports no
method (and no method imports anything that imports the registry back). ``register`` adds your
own method classes. Registration happens at import time; lookups only read.
"""

from __future__ import annotations

import importlib
import threading
from types import MappingProxyType
from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.delta import DeltaBase

#: delta_type → module that defines (and registers) it.
BUILTIN_METHODS = MappingProxyType({
    "adapter": "engine.methods.adapter",
    "bitfit": "engine.methods.bitfit",
    "compacter": "engine.methods.compacter",
    "ia3": "engine.methods.ia3",
    "lora": "engine.methods.lora",
    "low_rank_adapter": "engine.methods.low_rank_adapter",
    "parallel_adapter": "engine.methods.parallel_adapter",
    "prefix": "engine.methods.prefix",
    "soft_prompt": "engine.methods.soft_prompt",
})


class MethodRegistry:
    """delta_type → method class; thread-safe, built-ins imported on first lookup."""

    def __init__(self) -> None:
        self._classes: dict[str, type[DeltaBase]] = {}
        self._lock = threading.Lock()

    def register(self, cls: type[DeltaBase]) -> type[DeltaBase]:
        """Class decorator: make a method available by its config's ``delta_type``."""
        delta_type = cls.config_class.delta_type
        with self._lock:
            known = self._classes.get(delta_type)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ConfigError(f"delta_type {delta_type!r} is already registered by {known.__name__}")
            self._classes[delta_type] = cls
        return cls

    def get(self, delta_type: str) -> type[DeltaBase]:
        if delta_type not in self._classes and delta_type in BUILTIN_METHODS:
            importlib.import_module(BUILTIN_METHODS[delta_type])
        try:
            return self._classes[delta_type]
        except (KeyError, TypeError):
            known = sorted(set(self._classes) | set(BUILTIN_METHODS))
            raise ConfigError(
                f"unknown delta_type {delta_type!r}; registered methods: {', '.join(known)}"
            ) from None

    def all(self) -> dict[str, type[DeltaBase]]:
        for module in BUILTIN_METHODS.values():
            importlib.import_module(module)
        with self._lock:
            return dict(self._classes)


#: The one registry (populated by imports and ``register``; guarded by its lock).
REGISTRY = MethodRegistry()


def register(cls: type[DeltaBase]) -> type[DeltaBase]:
    """Class decorator: make a method available by its config's ``delta_type``."""
    return REGISTRY.register(cls)


def method_for(delta_type: str) -> type[DeltaBase]:
    """The class implementing ``delta_type`` (a :class:`ConfigError` naming the known ones if none)."""
    return REGISTRY.get(delta_type)


def registered_methods() -> dict[str, type[DeltaBase]]:
    """Every registered method, built-ins included."""
    return REGISTRY.all()
