"""HTTP routes: the page, the JSON API, exports/imports, and the socket.io client from node_modules."""

from __future__ import annotations

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    render_template,
    request,
    send_from_directory,
)
from werkzeug.exceptions import HTTPException

from designer import exports
from designer.payloads import DesignBody, PayloadError, parse
from designer.preview import UNFREEZE
from designer.resources import socketio_client_dir
from designer.session import DesignSession
from designer.state import attached
from designer.store import (
    SESSION_COOKIE,
    SessionStore,
    new_session_id,
    valid_session_id,
)
from designer.tree_filter import filter_tree
from engine import (
    CATALOG,
    DEFAULT_SOURCE,
    DeltaError,
    Design,
    ModuleTree,
    list_architectures,
)

bp = Blueprint("designer", __name__)


def _store() -> SessionStore:
    return current_app.extensions["delta_designer"]


#: the header (and, for export links, the query parameter) naming a tab's own session
TAB_HEADER = "X-Delta-Tab"


def current_session() -> DesignSession:
    """The tab's session when the page names it, else the browser's (the cookie's)."""
    tab = request.headers.get(TAB_HEADER) or request.args.get("tab")
    if valid_session_id(tab):
        return _store().get(str(tab))
    cookie = request.cookies.get(SESSION_COOKIE)
    if not valid_session_id(cookie):
        raise PayloadError("no design session: open the designer page first (it sets a cookie)")
    return _store().get(str(cookie))


@bp.get("/")
def index() -> Response:
    store = _store()
    cookie = request.cookies.get(SESSION_COOKIE)
    session_id = cookie if valid_session_id(cookie) else new_session_id()
    session = store.get(session_id)
    if session.loaded is None:  # show the server's backbone straight away
        source = current_app.config["BACKBONE"]
        waiting = _still_loading(store, source)
        if waiting is not None:
            return waiting
        store.use(session, store.backbones.get(source), autosave=False)  # a first visit writes nothing
    response = Response(render_template("index.html", backbone=session.require()[0].summary()))
    if session_id != cookie:
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="Strict")
    return response


def _still_loading(store: SessionStore, source: str) -> Response | None:
    """The page shown while the server's own backbone loads in the background (it reloads
    itself each second), or its load error; None once the backbone is there."""
    backbones = store.backbones
    failure = backbones.failures.get(source)
    progress = backbones.progress(source)
    if failure is None and (progress is None or backbones.cached(source) is not None):
        return None
    done, total = progress or (0, 1)
    page = render_template("loading.html", source=source, done=done, total=total, failure=failure)
    return Response(page, status=500 if failure else 503, headers={"Retry-After": "1"})


@bp.get("/api/health")
def health() -> Response:
    """Liveness, and the state of the server's own backbone: loading (with progress), ready or failed."""
    backbones = _store().backbones
    source = current_app.config["BACKBONE"]
    progress = backbones.progress(source)
    state = ("failed" if source in backbones.failures else
             "ready" if backbones.cached(source) is not None else "loading" if progress else "not loaded")
    body: dict[str, object] = {"status": "ok", "backbone": {"source": source, "state": state}}
    if progress:
        body["backbone"]["done"], body["backbone"]["total"] = progress  # type: ignore[index]
    return jsonify(body)


@bp.get("/api/backbones")
def backbones() -> Response:
    return jsonify({
        "default": DEFAULT_SOURCE,
        "server": current_app.config["BACKBONE"],
        "catalog": [{"name": e.name, "source": f"catalog:{e.name}", "class_name": e.model_class,
                     "parameters": e.parameters, "description": e.description} for e in CATALOG.values()],
        "architectures": list_architectures(),
    })


@bp.get("/api/tree")
def tree() -> Response:
    session = current_session()
    loaded, _ = session.require()
    return jsonify({"backbone": loaded.summary(), "tree": loaded.collapsed.to_dict()})


@bp.get("/api/tree/filter")
def tree_filter() -> Response:
    """The collapsed nodes the filter box's text selects (the expressions' grammar, by the engine)."""
    loaded, _ = current_session().require()
    return jsonify({"nodes": filter_tree(loaded, request.args.get("q", ""))})


@bp.get("/api/peft-defaults")
def peft_defaults() -> Response:
    """The modules PEFT's default ``target_modules`` would wrap on the shown backbone, and how
    they differ from this tab's design (its delta groups' modules)."""
    session = current_session()
    loaded, _ = session.require()
    defaults = loaded.peft_defaults()
    with session.lock:
        design = {p for g in session.groups if g.method != UNFREEZE for p in g.selection}
    chosen = set(defaults["paths"])
    return jsonify({**defaults, "count": len(chosen), "in_design": len(chosen & design),
                    "not_in_design": len(chosen - design), "design_only": len(design - chosen)})


@bp.get("/api/design")
def design() -> Response:
    return jsonify(current_session().snapshot())


@bp.get("/api/design/export")
def export() -> Response:
    filename, mime, text = exports.export(current_session(), request.args.get("format", "json"))
    return Response(text, mimetype=mime,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@bp.post("/api/design/import")
def import_design() -> tuple[Response, int] | Response:
    document = request.get_json(silent=True)
    if not isinstance(document, dict):
        raise PayloadError("the body must be a delta-design/1 JSON object", "import")
    parse(DesignBody, document, "import")
    session = current_session()
    session.import_design(Design.from_dict(document))
    return jsonify(notify(session))


def notify(session: DesignSession) -> dict:
    """After an edit made over REST: note it, and send the design to the session's tabs."""
    _store().edited(session)
    snapshot = session.snapshot()
    current_app.extensions["delta_designer_socketio"].emit("design_updated", snapshot, to=session.id)
    return snapshot


@bp.post("/api/design/build")
def build() -> Response:
    """Build the design with the engine on the loaded backbone; report its real count and tree."""
    session = current_session()
    loaded, _ = session.require()
    design = session.design()
    model = loaded.backbone.model
    planned = session.snapshot()["totals"]["trainable"]
    if planned > loaded.tree.total_parameters:  # checked on the weight-free twin, before any allocation
        raise PayloadError(f"this design would train {planned:,} parameters, more than the whole backbone "
                           f"({loaded.tree.total_parameters:,}); lower its sizes (rank, bottleneck, "
                           "prefix length) before building", "build")
    with loaded.lock, attached(model, design) as applied:  # one build at a time, undone whatever happens
        built_tree = ModuleTree.from_model(model).collapse().to_dict()
        trainable = applied.num_trainable_parameters()
        per_delta = {d.name: d.own_trainable_parameters() for d in applied.deltas}
    return jsonify({"trainable": trainable, "deltas": per_delta,
                    "preview_trainable": session.snapshot()["totals"]["trainable"], "tree": built_tree})


@bp.get("/vendor/socket.io/<path:filename>")
def socketio_client(filename: str) -> Response:
    return send_from_directory(socketio_client_dir(), filename)


def _error(message: str, status: int, kind: str, field: str | None = None) -> tuple[Response, int]:
    return jsonify({"error": message, "type": kind, "field": field}), status


@bp.app_errorhandler(PayloadError)
def payload_error(error: PayloadError) -> tuple[Response, int]:
    return _error(str(error), 400, "PayloadError", error.field)


@bp.app_errorhandler(DeltaError)
def delta_error(error: DeltaError) -> tuple[Response, int]:
    return _error(str(error), 400, type(error).__name__)


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> tuple[Response, int]:
    return _error(str(error.description), error.code or 500, error.name)


@bp.app_errorhandler(Exception)
def unexpected(error: Exception) -> tuple[Response, int]:
    current_app.logger.exception("request failed")
    return _error(f"internal error: {type(error).__name__}", 500, "InternalError")
