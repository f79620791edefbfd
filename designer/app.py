"""The Flask application factory. Nothing is built at import time."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from flask_socketio import SocketIO

from designer import bounded_json, events, security
from designer.designs_api import api as designs_api
from designer.memory_api import api as memory_api
from designer.named import NamedDesigns
from designer.resources import resource_dir
from designer.state import DEFAULT_BUDGET_BYTES, BackboneCache
from designer.store import MAX_SESSIONS, SessionStore
from designer.views import bp
from engine import DEFAULT_SOURCE, human_count

DEFAULTS: dict[str, Any] = {
    "BACKBONE": DEFAULT_SOURCE,
    "WORKSPACE": str(Path.home() / ".delta-designer"),
    "TOKEN": None,
    "BACKBONE_BUDGET_BYTES": DEFAULT_BUDGET_BYTES,
    "MAX_SESSIONS": MAX_SESSIONS,  # sessions held in memory; idle ones beyond wait on disk  # loaded backbones kept beyond this are evicted (LRU)
    "HOST_POLICY": security.HostPolicy.for_bind("127.0.0.1"),  # the CLI sets it from --host
}


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON with :mod:`designer.bounded_json`'s bounds on what clients send."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return bounded_json.loads(s, **kwargs)


def create_app(config: dict[str, Any] | None = None) -> tuple[Flask, SocketIO]:
    """Build the designer app and its Socket.IO server from ``config`` (see :data:`DEFAULTS`)."""
    app = Flask(
        __name__,
        template_folder=str(resource_dir("templates")),
        static_folder=str(resource_dir("static")),
    )
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    app.json = BoundedJSONProvider(app)
    app.jinja_env.filters["human_count"] = human_count
    app.jinja_env.filters["thousands"] = "{:,}".format
    backbones = BackboneCache(app.config["BACKBONE"], int(app.config["BACKBONE_BUDGET_BYTES"]))
    store = SessionStore(Path(app.config["WORKSPACE"]), backbones, int(app.config["MAX_SESSIONS"]))
    app.extensions["delta_designer"] = store
    atexit.register(store.flush_autosaves)  # a stopping server writes what its writer still holds
    app.extensions["delta_designer_named"] = NamedDesigns(Path(app.config["WORKSPACE"]))
    security.install(app)
    app.register_blueprint(bp)
    app.register_blueprint(designs_api)
    app.register_blueprint(memory_api)
    # one client's events are handled one after another, in the order sent (a fast clicker's or
    # a script's pipelined ticks are never applied out of order); Host/Origin checked on connect
    socketio = SocketIO(app, async_mode="threading", async_handlers=False, json=bounded_json)
    app.extensions["delta_designer_socketio"] = socketio
    events.register(socketio, app, store)
    return app, socketio
