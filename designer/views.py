"""HTTP routes: the page, the JSON API, and the socket.io browser client from node_modules."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, send_from_directory
from werkzeug.exceptions import HTTPException

from designer.resources import socketio_client_dir
from engine import DeltaError

bp = Blueprint("designer", __name__)


def _store() -> Any:
    return current_app.extensions["delta_designer"]


@bp.get("/")
def index() -> str:
    loaded = _store().get()
    return render_template(
        "index.html",
        backbone=loaded.summary(),
        root=loaded.collapsed.root,
    )


@bp.get("/api/health")
def health() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/api/tree")
def tree() -> Response:
    loaded = _store().get()
    return jsonify({"backbone": loaded.summary(), "tree": loaded.collapsed.to_dict()})


@bp.get("/vendor/socket.io/<path:filename>")
def socketio_client(filename: str) -> Response:
    return send_from_directory(socketio_client_dir(), filename)


@bp.app_errorhandler(DeltaError)
def delta_error(error: DeltaError) -> tuple[Response, int]:
    return jsonify({"error": str(error), "type": type(error).__name__}), 400


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> tuple[Response, int]:
    return jsonify({"error": error.description, "type": error.name}), error.code or 500
