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


def socketio_client_dir() -> Path:
    """``node_modules/socket.io-client/dist`` (installed by ``npm ci``)."""
    return _PACKAGE.parent / "node_modules" / "socket.io-client" / "dist"
