"""Where the designer's templates, static files and npm packages live.

In a checkout they sit at the repository root (the layout DESIGN.md fixes); in a wheel they are
packaged inside ``designer/``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The first existing ``designer/<name>`` or ``<repo>/<name>`` directory."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the designer's {name}/ directory is missing (looked beside {_PACKAGE})")


#: the socket.io client files the page loads; ``make dist`` copies them into the wheel
SOCKETIO_FILES = ("socket.io.esm.min.js", "socket.io.esm.min.js.map")


def socketio_client_dir() -> Path:
    """The socket.io client: copied into the package by ``make dist`` (a wheel), else
    ``node_modules/socket.io-client/dist`` of the checkout (installed by ``npm ci``)."""
    packaged = _PACKAGE / "static" / "vendor" / "socket.io"
    if (packaged / SOCKETIO_FILES[0]).is_file():
        return packaged
    return _PACKAGE.parent / "node_modules" / "socket.io-client" / "dist"
