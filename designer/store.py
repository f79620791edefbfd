"""Sessions by id (one per browser context, from a cookie), autosaved to the workspace.

Each accepted edit rewrites ``<workspace>/sessions/<id>.json`` atomically, so a reload — or a
server restart — finds the design where it was left.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from designer.autosave import AutosaveWriter
from designer.preview import Previewer
from designer.session import DesignSession
from designer.state import BackboneCache, LoadedBackbone
from engine import DeltaError, atomic_write_bytes

SESSION_COOKIE = "delta_designer_session"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
log = logging.getLogger(__name__)
#: design sessions kept in memory (each is small; the rest wait on disk)
MAX_SESSIONS = 1024


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def valid_session_id(value: str | None) -> bool:
    return bool(value and _SESSION_ID.match(value))


class SessionStore:
    """Creates, restores and autosaves design sessions; holds one previewer per backbone."""

    def __init__(self, workspace: Path, backbones: BackboneCache, max_sessions: int = MAX_SESSIONS) -> None:
        self.directory = workspace / "sessions"
        self.backbones = backbones
        backbones.in_use = self.open_backbones
        backbones.on_evict = self._forget
        self._remove_interrupted_writes()
        #: sessions in memory, least recently used first; beyond ``max_sessions`` the oldest
        #: without a connected socket are dropped (every change is on disk, so they come back)
        self._sessions: dict[str, DesignSession] = {}
        self._sockets: dict[str, int] = {}
        self.max_sessions = max_sessions
        self._previewers: dict[int, Previewer] = {}
        #: a browser's (cookie) session id → the tab session it edited last
        self._latest: dict[str, str] = {}
        self._guard = threading.Lock()
        self._writer = AutosaveWriter(lambda session: self._save(session.id, session.state()))

    def flush_autosaves(self, timeout: float = 10.0) -> bool:
        """Wait until the background writer has written every queued autosave (shutdown, tests)."""
        return self._writer.flush(timeout)

    def _remove_interrupted_writes(self) -> None:
        """Temporary files of autosaves a killed server never renamed into place (``.ID.json.*``;
        the autosave itself is intact: it is only ever replaced by a rename)."""
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.json.*"):
                leftover.unlink(missing_ok=True)

    def open_backbones(self) -> set[int]:
        """Ids of the backbones some session has open (the cache never evicts those)."""
        with self._guard:
            return {id(s.loaded) for s in self._sessions.values() if s.loaded is not None}

    def _forget(self, loaded: LoadedBackbone) -> None:
        with self._guard:
            self._previewers.pop(id(loaded), None)

    def previewer(self, loaded: LoadedBackbone) -> Previewer:
        with self._guard:
            return self._previewers.setdefault(id(loaded), Previewer(loaded))

    def get(self, session_id: str) -> DesignSession:
        """The session for ``session_id`` (restored from its autosave file on first use)."""
        if not valid_session_id(session_id):
            raise ValueError("invalid session id")
        with self._guard:
            session = self._sessions.pop(session_id, None)
            restore = session is None
            if session is None:
                session = DesignSession(session_id, lambda state, sid=session_id: self._save(sid, state),
                                        self._writer.enqueue)
            self._sessions[session_id] = session  # most recently used last
            self._drop_idle_sessions()
        if restore:
            self._restore(session)
        return session

    def fork(self, browser: DesignSession) -> DesignSession:
        """A new session (a new browser tab's) starting from a copy of the design this browser
        (its cookie's session) edited last, in whichever tab; independent from then on, and
        written nothing until its first edit."""
        with self._guard:
            latest = self._latest.get(browser.id)
        base = self.get(latest) if latest is not None else browser
        session = self.get(new_session_id())
        session.parent = browser.id
        self.edited(session)
        with base.lock:
            loaded, state = base.loaded, base.state()
        if loaded is not None:
            with session.lock:
                session.loaded, session.preview = loaded, self.previewer(loaded)
                session.restore(state)
        return session

    def edited(self, session: DesignSession) -> None:
        """Note the tab session a browser edited last (new tabs start from its design)."""
        if session.parent is not None:
            with self._guard:
                self._latest.pop(session.parent, None)
                self._latest[session.parent] = session.id
                while len(self._latest) > self.max_sessions:
                    self._latest.pop(next(iter(self._latest)))

    def connected(self, session_id: str, change: int) -> None:
        """Count a socket connecting (+1) to or leaving (-1) a session; connected ones stay."""
        with self._guard:
            count = self._sockets.get(session_id, 0) + change
            if count > 0:
                self._sockets[session_id] = count
            else:
                self._sockets.pop(session_id, None)

    def _drop_idle_sessions(self) -> None:
        excess = len(self._sessions) - self.max_sessions
        for session_id in [i for i in self._sessions if i not in self._sockets][:max(excess, 0)]:
            del self._sessions[session_id]

    def use(self, session: DesignSession, loaded: LoadedBackbone, autosave: bool = True) -> None:
        session.use_backbone(loaded, self.previewer(loaded), autosave)

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.json"

    def _save(self, session_id: str, state: dict[str, Any]) -> None:
        atomic_write_bytes(self._path(session_id), json.dumps(state, indent=1, allow_nan=False).encode())

    def _restore(self, session: DesignSession) -> None:
        path = self._path(session.id)
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text())
            source = state.get("backbone")
            if not source:
                return
            loaded = self.backbones.get(source)
            with session.lock:
                session.loaded, session.preview = loaded, self.previewer(loaded)
                session.restore(state)
        except (OSError, ValueError, KeyError, TypeError, DeltaError) as error:
            # keep the unreadable design beside, never overwrite it, and start afresh
            kept = path.with_suffix(f".unrestorable-{int(time.time())}.json")
            path.replace(kept)
            log.warning("could not restore session %s (%s); kept it as %s", session.id, error, kept)
            session.loaded = session.preview = None
