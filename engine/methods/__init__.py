"""Delta methods, one module each, registered by ``delta_type``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.delta import DeltaBase

REGISTRY: dict[str, type[DeltaBase]] = {}


def register(cls: type[DeltaBase]) -> type[DeltaBase]:
    """Class decorator: make a method available by its config's ``delta_type``."""
    REGISTRY[cls.config_class.delta_type] = cls
    return cls


def method_for(delta_type: str) -> type[DeltaBase]:
    _load_builtin_methods()
    try:
        return REGISTRY[delta_type]
    except KeyError:
        raise ConfigError(
            f"unknown delta_type {delta_type!r}; registered methods: {', '.join(sorted(REGISTRY))}"
        ) from None


def registered_methods() -> dict[str, type[DeltaBase]]:
    _load_builtin_methods()
    return dict(REGISTRY)


def _load_builtin_methods() -> None:
    from engine.methods import (  # noqa: F401 - importing registers them
        adapter, bitfit, compacter, ia3, lora, low_rank_adapter, parallel_adapter, prefix, soft_prompt,
    )
