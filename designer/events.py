"""Socket.IO events (snake_case). Client → server: load_backbone, toggle_nodes, set_group,
add_group, remove_group, select_group, set_expressions, set_layers, set_dtype, undo, redo. Server → client:
load_progress, backbone_loaded, design_updated, error.

Every payload is validated; a bad one gets an ``error`` event naming the field, never a
traceback, and the design stays as it was. Events may carry ``seq`` (the client's count): the
answer echoes it, and ``design_updated`` carries the session's ``version`` (newer is larger) and
``server_ms`` (how long the server took), so a page never shows an older design over a newer one.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, request
from flask_socketio import SocketIO, join_room

from designer import payloads as p
from designer.preview import method_catalogue
from designer.security import TOKEN_COOKIE
from designer.session import DesignSession
from designer.store import (
    SESSION_COOKIE,
    SessionStore,
    new_session_id,
    valid_session_id,
)
from engine import DeltaError

log = logging.getLogger(__name__)


def backbone_message(session: DesignSession) -> dict[str, Any]:
    loaded, _ = session.require()
    return {"backbone": loaded.summary(), "tree": loaded.collapsed.to_dict(), "methods": method_catalogue(),
            "roles": loaded.roles(), "diagram": loaded.schematic()}


def register(socketio: SocketIO, app: Flask, store: SessionStore) -> None:
    sessions: dict[str, DesignSession] = {}
    #: the last sequence number each connection sent (events on one connection run in order);
    #: connections run on their own threads, so the dict is locked
    last_seq: dict[str, int] = {}
    seq_lock = threading.Lock()

    def current() -> DesignSession:
        session = sessions.get(request.sid)  # type: ignore[attr-defined]
        if session is None:
            raise p.PayloadError("this connection has no session; reload the page")
        return session

    def report(error: Exception, event: str, payload: Any) -> None:
        group = payload.get("group_id") if isinstance(payload, dict) else None
        seq = payload.get("seq") if isinstance(payload, dict) and type(payload.get("seq")) is int else None
        field = getattr(error, "field", None)
        node = payload.get("node_path") if isinstance(payload, dict) and isinstance(payload.get("node_path"), str) else None
        socketio.emit("error", {"event": event, "message": str(error), "field": field, "group_id": group,
                                "seq": seq, "node_path": node}, to=request.sid)  # type: ignore[attr-defined]

    def in_order(message: p.Message, event: str) -> None:
        """Refuse an event whose sequence number is not after the connection's last one."""
        if message.seq is None:
            return
        sid = request.sid  # type: ignore[attr-defined]
        with seq_lock:
            last = last_seq.get(sid)
            if last is not None and message.seq <= last:
                raise p.PayloadError(f"{event}: event number {message.seq} came after number {last}; "
                                     "events are applied in the order sent, so this one was not", "seq")
            last_seq[sid] = message.seq

    def handler(event: str, schema: type[p.Message]) -> Callable[[Callable[[DesignSession, Any], None]], None]:
        """Register ``event``: validate against ``schema``, run, then send the design to the
        session's tabs. Every event gets exactly one answer: the design, or an error."""

        def wrap(function: Callable[[DesignSession, Any], None]) -> None:
            @functools.wraps(function)
            def run(payload: Any = None) -> None:
                started = time.perf_counter()
                try:
                    session = current()
                    message = p.parse(schema, payload, event)
                    in_order(message, event)
                    with session.saved_after():  # the answer first, then the autosave
                        function(session, message)
                        store.edited(session)
                        answer = {**session.snapshot(), "seq": message.seq,
                                  "server_ms": round((time.perf_counter() - started) * 1e3, 3)}
                        socketio.emit("design_updated", answer, to=session.id)
                except (p.PayloadError, DeltaError) as error:
                    report(error, event, payload)
                except Exception as error:  # noqa: BLE001 - the server must stay up
                    log.exception("event %s failed", event)
                    report(RuntimeError(f"internal error in {event}: {type(error).__name__}"), event, payload)

            socketio.on_event(event, run)

        return wrap

    @socketio.on("connect")
    def connect(auth: Any = None) -> bool:
        policy = app.config["HOST_POLICY"]
        origin = request.headers.get("Origin")
        if not policy.allows(request.host) or (origin is not None and not policy.allows(origin)):
            log.warning("refused a socket from host %r, origin %r", request.host, origin)
            return False
        token = app.config.get("TOKEN")
        given = request.cookies.get(TOKEN_COOKIE)
        if not given and isinstance(auth, dict):
            given = auth.get("token")
        if token and not (given and secrets.compare_digest(str(given), token)):
            return False
        session = _tab_session(store, auth)
        sessions[request.sid] = session  # type: ignore[attr-defined]
        store.connected(session.id, +1)
        join_room(session.id)
        socketio.emit("hello", {"methods": method_catalogue(), "session": session.id[:6], "tab": session.id},
                      to=request.sid)  # type: ignore[attr-defined]
        if session.loaded is not None:
            socketio.emit("backbone_loaded", backbone_message(session), to=request.sid)  # type: ignore[attr-defined]
            socketio.emit("design_updated", session.snapshot(), to=request.sid)  # type: ignore[attr-defined]
        return True

    @socketio.on("disconnect")
    def disconnect(*_: Any) -> None:
        with seq_lock:
            last_seq.pop(request.sid, None)  # type: ignore[attr-defined]
        session = sessions.pop(request.sid, None)  # type: ignore[attr-defined]
        if session is not None:
            store.connected(session.id, -1)

    @socketio.on("load_backbone")
    def load_backbone(payload: Any = None) -> None:
        try:
            session = current()
            message = p.parse(p.LoadBackbone, payload, "load_backbone")
            in_order(message, "load_backbone")
            source = message.source  # type: ignore[attr-defined]
        except p.PayloadError as error:
            report(error, "load_backbone", payload)
            return
        sid = request.sid  # type: ignore[attr-defined]
        socketio.start_background_task(_load, socketio, store, session, source.strip(), sid)

    @handler("add_group", p.AddGroup)
    def add_group(session: DesignSession, message: p.AddGroup) -> None:
        session.add_group(message.method or "lora")

    @handler("remove_group", p.GroupId)
    def remove_group(session: DesignSession, message: p.GroupId) -> None:
        session.remove_group(message.group_id)

    @handler("select_group", p.GroupId)
    def select_group(session: DesignSession, message: p.GroupId) -> None:
        session.select_group(message.group_id)

    @handler("set_group", p.SetGroup)
    def set_group(session: DesignSession, message: p.SetGroup) -> None:
        session.set_group(message.group_id, name=message.name, method=message.method, route=message.route,
                          hyperparameters=message.hyperparameters)

    @handler("toggle_nodes", p.ToggleNodes)
    def toggle_nodes(session: DesignSession, message: p.ToggleNodes) -> None:
        session.toggle_nodes(message.group_id, list(message.paths), message.checked)

    @handler("set_expressions", p.SetExpressions)
    def set_expressions(session: DesignSession, message: p.SetExpressions) -> None:
        session.set_expressions(message.group_id, list(message.expressions), roles=message.roles)

    @handler("set_layers", p.SetLayers)
    def set_layers(session: DesignSession, message: p.SetLayers) -> None:
        session.set_layers(message.group_id, message.node_path, message.layers)

    @handler("set_dtype", p.SetDtype)
    def set_dtype(session: DesignSession, message: p.SetDtype) -> None:
        session.set_dtype(message.dtype)

    @handler("undo", p.Message)
    def undo(session: DesignSession, message: p.Message) -> None:
        session.undo()

    @handler("redo", p.Message)
    def redo(session: DesignSession, message: p.Message) -> None:
        session.redo()


def _tab_session(store: SessionStore, auth: Any) -> DesignSession:
    """The session a socket edits. The page sends its tab's session id (kept in the tab's
    sessionStorage), or asks for a fork on a tab's first connection: each tab is its own design,
    starting from the browser's latest (the cookie's). Clients that send neither use the
    cookie's session."""
    cookie = request.cookies.get(SESSION_COOKIE)
    base = store.get(cookie if valid_session_id(cookie) else new_session_id())
    if isinstance(auth, dict):
        tab = auth.get("tab")
        if isinstance(tab, str) and valid_session_id(tab):
            return store.get(tab)
        if auth.get("fork") is True:
            return store.fork(base)
    return base


def _load(socketio: SocketIO, store: SessionStore, session: DesignSession, source: str, sid: str) -> None:
    """Load a backbone in the background, streaming progress, then show it to the session."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 0.05:
            last[0] = now
            socketio.emit("load_progress", {"source": source, "done": done, "total": total}, to=sid)

    socketio.emit("load_progress", {"source": source, "done": 0, "total": 1}, to=sid)
    try:
        loaded = store.backbones.get(source, progress)
        store.use(session, loaded)
        socketio.emit("load_progress", {"source": source, "done": 1, "total": 1}, to=sid)
        socketio.emit("backbone_loaded", backbone_message(session), to=session.id)
        socketio.emit("design_updated", session.snapshot(), to=session.id)
    except DeltaError as error:
        socketio.emit("error", {"event": "load_backbone", "message": str(error), "field": "backbone",
                                "group_id": None}, to=sid)
    except Exception as error:  # noqa: BLE001 - report, never crash the server
        log.exception("loading %s failed", source)
        socketio.emit("error", {"event": "load_backbone", "field": "backbone", "group_id": None,
                                "message": f"could not load {source!r}: {type(error).__name__}: {error}"}, to=sid)
