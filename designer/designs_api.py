"""REST routes for named designs (``/api/designs``): the tab's design saved under a name, and
saved designs listed, opened, renamed, duplicated and deleted (see :mod:`designer.named`)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from designer.compare import compare
from designer.exports import design_document
from designer.named import NamedDesigns
from designer.payloads import DesignBody, PayloadError, parse
from designer.views import current_session, notify
from engine import Design

api = Blueprint("designs", __name__)


def _designs() -> NamedDesigns:
    return current_app.extensions["delta_designer_named"]


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object")
    return body


def _saved(name: str) -> dict[str, Any]:
    """A saved design, held to the same bounds as an imported one (the file may be hand-made)."""
    document = _designs().read(name)
    parse(DesignBody, document, f"design {name!r}")
    return document


def _listing() -> Response:
    return jsonify({"designs": _designs().list()})


@api.get("/api/designs")
def listing() -> Response:
    return _listing()


@api.post("/api/designs")
def save() -> Response:
    body = _body()
    _designs().save(body.get("name"), design_document(current_session()), replace=body.get("replace") is True)
    return _listing()


@api.post("/api/designs/<name>/open")
def open_design(name: str) -> Response:
    """Open a saved design in this tab; one made for another backbone says which, and changes nothing."""
    document = _saved(name)
    session = current_session()
    loaded, _ = session.require()
    source = (document.get("backbone") or {}).get("source")
    if source and source != loaded.source:
        raise PayloadError(f"design {name!r} was made for {source}, not {loaded.source}: load {source} first, "
                           "then open it", "backbone")
    session.import_design(Design.from_dict(document))
    return jsonify(notify(session))


@api.get("/api/designs/compare")
def compare_designs() -> Response:
    """``?a=NAME&b=NAME``: two saved designs of the shown backbone, side by side."""
    names = [request.args.get("a"), request.args.get("b")]
    if any(not name for name in names) or names[0] == names[1]:
        raise PayloadError("compare needs two different saved designs: ?a=NAME&b=NAME", "compare")
    return jsonify(compare(current_session(), {name: _saved(name) for name in names}))


@api.post("/api/designs/<name>/rename")
def rename(name: str) -> Response:
    _designs().rename(name, _body().get("new_name"))
    return _listing()


@api.post("/api/designs/<name>/duplicate")
def duplicate(name: str) -> Response:
    _designs().duplicate(name, _body().get("new_name"))
    return _listing()


@api.delete("/api/designs/<name>")
def delete(name: str) -> Response:
    _designs().delete(name)
    return _listing()
