"""A lock kept on each backbone, so threads that change or probe the same model take turns.

Attaching, detaching and the pseudo-input passes of runtime initialisation change a backbone's
hooks, submodules and (for a moment) its mode; two threads doing that to one model at once would
see each other's half-done work. The lock lives on the model itself — no registry in the engine —
and a copy of the model (``copy.deepcopy``, pickling) gets a fresh one.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

_ATTRIBUTE = "_delta_engine_lock"


class ModelLock:
    """A re-entrant lock that copies and pickles as a new, unlocked lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> ModelLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelLock:
        return ModelLock()

    def __reduce__(self) -> tuple[type[ModelLock], tuple[()]]:
        return ModelLock, ()


def model_lock(model: nn.Module) -> ModelLock:
    """The model's lock, created on first use (``dict.setdefault`` is atomic, so threads racing
    to create it get the same one)."""
    lock = model.__dict__.get(_ATTRIBUTE)
    if lock is None:
        lock = model.__dict__.setdefault(_ATTRIBUTE, ModelLock())
    return lock
