"""Undo/redo of a design, and the designs kept per backbone, so no edit and no switch loses work.

A *snapshot* is what a design is made of — its groups (selections as module paths), the active
group, the group counter and the dtype — deep-copied, so later edits never reach it. Both the
history and the per-backbone shelf are bounded: they live in memory for every session.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from designer.payloads import PayloadError

#: edits an undo can go back through
MAX_UNDO = 100
#: backbones whose designs a session keeps while another one is shown
MAX_SHELVED = 16


@dataclass(frozen=True)
class Snapshot:
    groups: Any
    active: str | None
    counter: int
    dtype: str

    @classmethod
    def of(cls, groups: Any, active: str | None, counter: int, dtype: str) -> Snapshot:
        return cls(copy.deepcopy(groups), active, counter, dtype)

    def same_design(self, other: Snapshot | None) -> bool:
        """Equal groups and dtype: moving the active group alone is no edit to undo."""
        return other is not None and self.groups == other.groups and self.dtype == other.dtype


class History:
    """Snapshots before each accepted edit (undo) and after each undo (redo)."""

    def __init__(self) -> None:
        self._undo: deque[Snapshot] = deque(maxlen=MAX_UNDO)
        self._redo: list[Snapshot] = []
        self._current: Snapshot | None = None

    def start(self, snapshot: Snapshot) -> None:
        """A design shown afresh (a new or restored backbone): nothing to undo yet."""
        self._undo.clear()
        self._redo.clear()
        self._current = snapshot

    def record(self, snapshot: Snapshot) -> None:
        """An accepted edit produced ``snapshot``: the previous one becomes undoable."""
        if self._current is not None and not snapshot.same_design(self._current):
            self._undo.append(self._current)
            self._redo.clear()
        self._current = snapshot

    def undo(self, now: Snapshot) -> Snapshot | None:
        return self._move(self._undo, self._redo, now)

    def redo(self, now: Snapshot) -> Snapshot | None:
        return self._move(self._redo, self._undo, now)

    def _move(self, source: Any, target: Any, now: Snapshot) -> Snapshot | None:
        """Step to ``source``'s last snapshot, keeping ``now`` on ``target`` to step back to."""
        if not source:
            return None
        target.append(now)
        self._current = source.pop()
        return self._current

    def counts(self) -> dict[str, int]:
        return {"undo": len(self._undo), "redo": len(self._redo)}


class Shelf:
    """The designs of backbones not shown now (as autosave states), most recent last."""

    def __init__(self) -> None:
        self._designs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def put(self, source: str, state: dict[str, Any]) -> None:
        self._designs.pop(source, None)
        self._designs[source] = state
        while len(self._designs) > MAX_SHELVED:
            self._designs.popitem(last=False)

    def take(self, source: str) -> dict[str, Any] | None:
        return self._designs.pop(source, None)

    def states(self) -> dict[str, dict[str, Any]]:
        return dict(self._designs)

    def load(self, states: Any) -> None:
        if isinstance(states, dict):
            for source, state in list(states.items())[-MAX_SHELVED:]:
                if isinstance(source, str) and isinstance(state, dict):
                    self._designs[source] = state


class Undoable:
    """Undo and redo for a design session (which provides the attributes and methods used)."""

    lock: threading.RLock
    history: History
    groups: Any
    active: str | None
    dtype: str
    _counter: int

    def undo(self) -> None:
        """Go back one accepted edit (ticks, expressions, groups, options, imports)."""
        with self.lock:
            self._step(self.history.undo(self._snapshot()), "nothing to undo", "undo")

    def redo(self) -> None:
        with self.lock:
            self._step(self.history.redo(self._snapshot()), "nothing to redo", "redo")

    def _step(self, snapshot: Snapshot | None, empty: str, field: str) -> None:
        self.require()  # type: ignore[attr-defined]
        if snapshot is None:
            raise PayloadError(empty, field)
        self.groups, self.active = copy.deepcopy(snapshot.groups), snapshot.active
        self._counter, self.dtype = snapshot.counter, snapshot.dtype
        self._persist()  # type: ignore[attr-defined]

    def _snapshot(self) -> Snapshot:
        return Snapshot.of(self.groups, self.active, self._counter, self.dtype)
