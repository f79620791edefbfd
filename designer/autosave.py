"""Autosaves of socket edits, written after the answer: a session defers its writes within a
handler (:class:`DeferredSave`) and hands them to one background :class:`AutosaveWriter`, so a
connection answers its next event at once and a burst of edits becomes one write of the latest
design. Every write is still atomic (:func:`engine.checkpoint.atomic_write_bytes`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from designer.session import DesignSession

log = logging.getLogger(__name__)


class DeferredSave:
    """Autosaving for a design session (which provides ``_save``, ``_save_later``, ``state``
    and ``_deferring``, a ``threading.local``)."""

    _save: Callable[[dict[str, Any]], None]
    _save_later: Callable[[Any], None]
    _deferring: threading.local

    state: Callable[[], dict[str, Any]]

    def _persist(self) -> None:
        """Autosave now, or at the end of this thread's :meth:`saved_after` block."""
        if getattr(self._deferring, "active", False):
            self._deferring.pending = True
        else:
            self._save(self.state())

    @contextlib.contextmanager
    def saved_after(self) -> Iterator[None]:
        """Edits made by this thread inside the block are autosaved after it, by the background
        writer, as the session is when it writes (so a file never goes back to an older design;
        a crash before then leaves the previous design on disk, whole)."""
        self._deferring.active, self._deferring.pending = True, False
        try:
            yield
        finally:
            self._deferring.active = False
            if self._deferring.pending:
                self._save_later(self)


class AutosaveWriter:
    """Writes socket edits' autosaves on its own thread, so a connection answers its next event
    at once; a burst of edits to one session becomes one write of its latest design."""

    def __init__(self, write: Callable[[DesignSession], None]) -> None:
        self._write = write
        self._pending: dict[str, DesignSession] = {}
        self._wake = threading.Condition()
        self._busy = False
        threading.Thread(target=self._run, name="autosave-writer", daemon=True).start()

    def enqueue(self, session: DesignSession) -> None:
        with self._wake:
            self._pending[session.id] = session
            self._wake.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued autosave is written (tests, shutdown)."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._pending))
                session = self._pending.pop(next(iter(self._pending)))
                self._busy = True
            try:
                self._write(session)
            except Exception:  # noqa: BLE001 - a failed autosave is logged; the next edit retries
                log.exception("autosave of session %s failed", session.id)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
