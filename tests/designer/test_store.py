"""Autosaves survive a killed server: the file is only ever replaced by a rename, and the
temporary files a kill leaves behind are removed when the server starts again."""

from __future__ import annotations

import json

from designer.app import create_app


def test_temporary_files_of_interrupted_autosaves_are_removed_on_start(tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    kept = sessions / ("A" * 24 + ".json")
    kept.write_text(json.dumps({"backbone": "catalog:gpt2", "groups": []}))
    leftovers = [sessions / f".{'A' * 24}.json.k3j9x2", sessions / f".{'B' * 24}.json.0q1w2e"]
    for leftover in leftovers:
        leftover.write_text('{"half": ')
    unrelated = sessions / "notes.txt"
    unrelated.write_text("mine")
    create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    assert not any(leftover.exists() for leftover in leftovers)
    assert kept.exists() and unrelated.read_text() == "mine"


def test_first_visits_write_no_session_file_until_the_design_changes(tmp_path):
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    for _ in range(50):  # cookie-less requests, as a crawler or a script sends them
        assert app.test_client().get("/").status_code == 200
    sessions = tmp_path / "sessions"
    assert not sessions.exists() or not list(sessions.glob("*.json"))
    http = app.test_client()
    http.get("/")
    client = socketio.test_client(app, flask_test_client=http)
    design = [e for e in client.get_received() if e["name"] == "design_updated"][-1]["args"][0]
    client.emit("toggle_nodes", {"group_id": design["groups"][0]["id"], "paths": ["lm_head"], "checked": True})
    assert app.extensions["delta_designer"].flush_autosaves()
    assert len(list(sessions.glob("*.json"))) == 1  # the first change is autosaved


def test_idle_sessions_beyond_the_limit_leave_memory_and_come_back_from_disk(tmp_path):
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path), "MAX_SESSIONS": 3})
    store = app.extensions["delta_designer"]
    kept = app.test_client()
    kept.get("/")
    connected = socketio.test_client(app, flask_test_client=kept)  # a tab with its socket open
    group = [e for e in connected.get_received() if e["name"] == "design_updated"][-1]["args"][0]["groups"][0]["id"]
    changed = app.test_client()
    changed.get("/")
    changed.post("/api/design/import", json={"format": "delta-design/1", "deltas": [
        {"delta_type": "lora", "name": "mine", "modified_modules": ["attn.q"]}]})
    for _ in range(20):
        app.test_client().get("/")
    assert len(store._sessions) <= 3
    assert store._sockets and set(store._sockets) <= set(store._sessions)  # the connected one stays
    connected.emit("toggle_nodes", {"group_id": group, "paths": ["lm_head"], "checked": True})
    assert [e for e in connected.get_received() if e["name"] == "design_updated"]  # never dropped
    assert changed.get("/api/design").get_json()["groups"][0]["name"] == "mine"  # back from disk


def test_socket_edits_are_autosaved_after_the_answer_latest_design_last(tmp_path):
    """The writer thread writes a burst of socket edits as the session's latest design, and a
    stopping server (exit handlers) writes what it still holds."""
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    http = app.test_client()
    http.get("/")
    client = socketio.test_client(app, flask_test_client=http)
    group = [e for e in client.get_received() if e["name"] == "design_updated"][-1]["args"][0]["groups"][0]["id"]
    for rank in range(1, 41):
        client.emit("set_group", {"group_id": group, "hyperparameters": {"lora_r": rank}, "seq": rank})
    store = app.extensions["delta_designer"]
    assert store.flush_autosaves()
    (saved,) = (tmp_path / "sessions").glob("*.json")
    assert json.loads(saved.read_text())["groups"][0]["hyperparameters"]["lora_r"] == 40
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
