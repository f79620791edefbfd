"""Serving beyond loopback on gunicorn (threads, one worker), as Flask-SocketIO documents for its
threading mode, instead of Werkzeug's development server.

One worker, because sessions and loaded backbones live in that process; threads serve the
sockets and requests. The app is built in the worker (not the master), so the background load of
the server's backbone runs where the requests are answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

#: threads of the one worker: each open socket holds one
THREADS = 64


class DesignerServer(BaseApplication):  # type: ignore[misc]
    """gunicorn running the app that ``build()`` returns (called in the worker)."""

    def __init__(self, build: Callable[[], Flask], bind: str, threads: int = THREADS) -> None:
        self.build = build
        self.settings = {"bind": bind, "workers": 1, "threads": threads, "worker_class": "gthread",
                         "accesslog": None, "timeout": 0, "graceful_timeout": 5}
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.build()


def serve(build: Callable[[], Flask], host: str, port: int) -> None:
    """Serve ``build()`` on ``host:port`` until interrupted."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    DesignerServer(build, address).run()
