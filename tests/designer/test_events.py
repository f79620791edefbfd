"""Socket events against a real app (Flask-SocketIO's test client): edits, validation, isolation."""

import json

import pytest

from designer.app import create_app


@pytest.fixture()
def server(tmp_path):
    app, socketio = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    return app, socketio


def connect(app, socketio):
    http = app.test_client()
    http.get("/")  # sets the session cookie and shows the server's backbone
    client = socketio.test_client(app, flask_test_client=http)
    assert client.is_connected()
    return http, client


def last(client, name):
    events = [e for e in client.get_received() if e["name"] == name]
    assert events, f"no {name} event"
    return events[-1]["args"][0]


def test_connect_sends_methods_backbone_and_design(server):
    _, client = connect(*server)
    received = {e["name"]: e["args"][0] for e in client.get_received()}
    from engine import registered_methods

    assert [m["delta_type"] for m in received["hello"]["methods"]] == sorted(registered_methods()) + ["unfreeze"]
    assert received["backbone_loaded"]["backbone"]["parameters"] == 109_482_240
    design = received["design_updated"]
    assert [g["method"] for g in design["groups"]] == ["lora"] and design["totals"]["trainable"] == 0


def test_ticks_ranges_and_expressions_update_counts(server):
    _, client = connect(*server)
    group = last(client, "design_updated")["groups"][0]["id"]
    client.emit("toggle_nodes", {"group_id": group, "checked": True,
                                 "paths": ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"]})
    design = last(client, "design_updated")
    assert design["groups"][0]["expressions"] == ["query", "value"]
    assert design["totals"]["trainable"] == 294_912
    assert design["marks"]["encoder.layer.*.attention.self.query"] == {group: "full"}
    assert design["marks"]["encoder.layer.*.attention"] == {group: "partial"}
    client.emit("set_layers", {"group_id": group, "node_path": "encoder.layer.*", "layers": "0-5"})
    design = last(client, "design_updated")
    assert design["totals"]["trainable"] == 294_912 // 2
    assert design["groups"][0]["expressions"] == [r"[r]layer\.([0-5])\.attention\.self\.query",
                                                  r"[r]layer\.([0-5])\.attention\.self\.value"]
    client.emit("set_layers", {"group_id": group, "node_path": "encoder.layer.*", "layers": "6,8,10"})
    assert last(client, "design_updated")["totals"]["trainable"] == 294_912 // 4
    client.emit("set_expressions", {"group_id": group, "expressions": ["attn.q"]})
    design = last(client, "design_updated")
    assert design["groups"][0]["expressions"] == ["attn.q"] and design["totals"]["trainable"] == 147_456
    assert design["groups"][0]["match_counts"] == {"attn.q": 12}  # the name typed stays


def test_a_bad_edit_is_an_error_at_its_field_and_the_design_stays(server):
    _, client = connect(*server)
    group = last(client, "design_updated")["groups"][0]["id"]
    client.emit("set_expressions", {"group_id": group, "expressions": ["query"]})
    before = last(client, "design_updated")
    cases = [
        ("set_expressions", {"group_id": group, "expressions": ["qeury"]}, "expressions", "'qeury' matches no module"),
        ("set_group", {"group_id": group, "hyperparameters": {"lora_r": 0}}, "hyper:lora_r", "lora_r must be a positive integer"),
        ("set_group", {"group_id": group, "route": "sideways"}, "route", "does not support route"),
        ("toggle_nodes", {"group_id": group, "paths": ["encoder.layer.*.output.LayerNorm"], "checked": True},
         "selection", "lora cannot wrap 'encoder.layer.0.output.LayerNorm', a LayerNorm"),
        ("set_layers", {"group_id": group, "node_path": "encoder.layer.*", "layers": "10-14"}, "layers", "layers 10-14 are not in 0-11"),
        ("set_layers", {"group_id": group, "node_path": "encoder.layer.*", "layers": "0-999999999"}, "layers",
         "layers 0-999999999 are not in 0-11"),
        ("set_group", {"group_id": group, "name": "bad name"}, "name", "identifier"),
        ("set_group", {"group_id": group, "method": "loar"}, "method", "unknown delta_type 'loar'"),
    ]
    for event, payload, field, message in cases:
        client.emit(event, payload)
        error = last(client, "error")
        assert error["field"] == field, (event, error)
        assert message in error["message"], (event, error)
        assert error["group_id"] == group
    client.emit("set_dtype", {"dtype": "float32"})
    after = last(client, "design_updated")
    assert after["groups"] == before["groups"] and after["totals"]["trainable"] == 147_456


def test_malformed_payloads_get_error_events_and_the_server_stays_up(server):
    app, socketio = server
    _, client = connect(app, socketio)
    group = last(client, "design_updated")["groups"][0]["id"]
    batch = [
        ("toggle_nodes", None), ("toggle_nodes", "text"), ("toggle_nodes", []), ("toggle_nodes", 42),
        ("toggle_nodes", {"group_id": group}), ("toggle_nodes", {"group_id": group, "paths": "x", "checked": True}),
        ("toggle_nodes", {"group_id": group, "paths": [1, 2], "checked": True}),
        ("toggle_nodes", {"group_id": group, "paths": ["nope"], "checked": True}),
        ("toggle_nodes", {"group_id": 7, "paths": [], "checked": True}),
        ("set_group", {"group_id": group, "hyperparameters": [1]}), ("set_group", {"group_id": "g99"}),
        ("set_group", {"group_id": group, "hyperparameters": {"nope": 1}}),
        ("set_expressions", {"group_id": group, "expressions": [None]}),
        ("set_expressions", {"group_id": group, "expressions": ["[r](a"]}),
        ("set_layers", {"group_id": group, "node_path": "pooler", "layers": "1"}),
        ("set_layers", {"group_id": group, "node_path": "encoder.layer.*", "layers": "a-b"}),
        ("add_group", {"method": "nope"}), ("remove_group", {}), ("set_dtype", {"dtype": "float8"}),
        ("load_backbone", {"source": ""}), ("load_backbone", {"source": 5}),
        ("load_backbone", {"source": "python:os:getcwd"}),
    ]
    for event, payload in batch:
        client.emit(event, payload)
    errors = [e["args"][0] for e in client.get_received() if e["name"] == "error"]
    socketio.sleep(0.5)
    errors += [e["args"][0] for e in client.get_received() if e["name"] == "error"]
    assert len(errors) == len(batch), [e["message"] for e in errors]
    assert all("Traceback" not in e["message"] and e["message"] for e in errors)
    assert any("CLI and Python only" in e["message"] for e in errors)
    client.emit("set_expressions", {"group_id": group, "expressions": ["value"]})
    assert last(client, "design_updated")["totals"]["trainable"] == 147_456  # still up and right


def test_two_sessions_are_isolated_and_autosaved(server, tmp_path):
    app, socketio = server
    _, first = connect(app, socketio)
    _, second = connect(app, socketio)
    group = last(first, "design_updated")["groups"][0]["id"]
    second.get_received()
    first.emit("set_expressions", {"group_id": group, "expressions": ["query"]})
    assert last(first, "design_updated")["totals"]["trainable"] == 147_456
    assert not [e for e in second.get_received() if e["name"] == "design_updated"]
    assert app.extensions["delta_designer"].flush_autosaves()  # written just after the answer
    saved = list((tmp_path / "sessions").glob("*.json"))
    assert len(saved) == 1  # the second session changed nothing, so it wrote nothing
    states = [json.loads(p.read_text()) for p in saved]
    assert [s["groups"][0]["expressions"] for s in states] == [["query"]]
    # a new server on the same workspace restores the design for the same cookie
    cookie = next(p.stem for p, s in zip(saved, states) if s["groups"][0]["expressions"])
    app2, socketio2 = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    http = app2.test_client()
    http.set_cookie("delta_designer_session", cookie)
    client = socketio2.test_client(app2, flask_test_client=http)
    assert last(client, "design_updated")["totals"]["trainable"] == 147_456


def test_a_corrupt_autosave_is_kept_aside_not_lost(server, tmp_path):
    app, socketio = server
    (tmp_path / "sessions").mkdir()
    cookie = "A" * 24
    (tmp_path / "sessions" / f"{cookie}.json").write_text("{broken")
    http = app.test_client()
    http.set_cookie("delta_designer_session", cookie)
    assert http.get("/").status_code == 200
    kept = list((tmp_path / "sessions").glob(f"{cookie}.unrestorable-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{broken"


def test_an_autosave_too_costly_to_match_is_kept_aside_before_matching(server, tmp_path):
    app, _ = server
    (tmp_path / "sessions").mkdir()
    cookie = "B" * 24
    costly = [f"[r]encoder\\.layer\\.(0|1)\\.attention\\.self\\.query|x{'y' * 900}{i}" for i in range(512)]
    saved = {"backbone": "catalog:bert-base-uncased", "active": "g1", "dtype": "bfloat16", "counter": 64,
             "groups": [{"id": f"g{n}", "name": f"lora_{n}", "method": "lora", "route": "parallel",
                         "hyperparameters": {}, "layer_ranges": {}, "expressions": costly} for n in range(64)]}
    (tmp_path / "sessions" / f"{cookie}.json").write_text(json.dumps(saved))
    http = app.test_client()
    http.set_cookie("delta_designer_session", cookie)
    assert http.get("/").status_code == 200
    assert len(list((tmp_path / "sessions").glob(f"{cookie}.unrestorable-*.json"))) == 1
    assert http.get("/api/design").get_json()["groups"][0]["expressions"] == []  # a fresh design


def test_socket_requires_the_token_when_one_is_set(tmp_path):
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "TOKEN": "s3cret", "WORKSPACE": str(tmp_path)})
    assert not socketio.test_client(app).is_connected()
    http = app.test_client()
    assert http.get("/?token=s3cret").status_code == 303  # exchanged for a cookie
    assert socketio.test_client(app, flask_test_client=http).is_connected()


@pytest.mark.parametrize("headers", [{"Origin": "http://attacker.example:5000"},
                                     {"Host": "attacker.example:5000"}])
def test_a_socket_from_a_foreign_host_or_origin_is_refused(tmp_path, headers):
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    assert not socketio.test_client(app, headers=headers).is_connected()
    assert socketio.test_client(app, headers={"Origin": "http://127.0.0.1:5000"}).is_connected()


def test_a_hyperparameter_that_would_outgrow_the_backbone_is_refused_naming_both_sizes(server):
    _, client = connect(*server)
    group = last(client, "design_updated")["groups"][0]["id"]
    client.emit("toggle_nodes", {"group_id": group, "paths": ["encoder.layer.*.attention.self.query"], "checked": True})
    before = last(client, "design_updated")["totals"]["trainable"]
    client.emit("set_group", {"group_id": group, "hyperparameters": {"lora_r": 100_000}})
    error = last(client, "error")
    assert "would train 1,843,200,000 parameters, more than the whole backbone (109,482,240)" in error["message"]
    client.emit("set_group", {"group_id": group, "hyperparameters": {"lora_r": 4}})
    assert last(client, "design_updated")["totals"]["trainable"] == before // 2


def test_quick_picks_select_roles_where_typed_names_select_real_modules(server):
    _, client = connect(*server)
    group = last(client, "design_updated")["groups"][0]["id"]
    client.emit("set_expressions", {"group_id": group, "expressions": ["embeddings"]})  # bert-base's BertEmbeddings
    error = last(client, "error")
    assert error["field"] == "expressions" and "BertEmbeddings" in error["message"]
    client.emit("set_expressions", {"group_id": group, "expressions": ["embeddings"], "roles": True})
    design = last(client, "design_updated")
    assert design["groups"][0]["expressions"] == ["word_embeddings"]
    assert design["groups"][0]["trainable"] == 8 * (30522 + 768)  # LoRA r=8 on the token embedding


def _received(client) -> dict:
    """The last event of each name received since the last call."""
    return {e["name"]: e["args"][0] for e in client.get_received()}


def test_a_tab_forks_its_own_session_and_reconnects_to_it(server):
    app, socketio = server
    http = app.test_client()
    http.get("/")
    browser = socketio.test_client(app, flask_test_client=http)  # no auth: the cookie's session
    first = _received(browser)
    cookie_group = first["design_updated"]["groups"][0]["id"]
    browser.emit("set_expressions", {"group_id": cookie_group, "expressions": ["query"]})
    tab = socketio.test_client(app, flask_test_client=http, auth={"fork": True})
    opened = _received(tab)
    tab_id = opened["hello"]["tab"]
    assert tab_id != first["hello"]["tab"]
    assert opened["design_updated"]["groups"][0]["expressions"] == ["query"]  # starts from the browser's design
    tab.emit("set_expressions", {"group_id": opened["design_updated"]["groups"][0]["id"], "expressions": ["value"]})
    assert last(tab, "design_updated")["groups"][0]["expressions"] == ["value"]
    browser.emit("select_group", {"group_id": cookie_group})
    assert last(browser, "design_updated")["groups"][0]["expressions"] == ["query"]  # untouched
    again = socketio.test_client(app, flask_test_client=http, auth={"tab": tab_id})  # a reload of that tab
    assert last(again, "design_updated")["groups"][0]["expressions"] == ["value"]
    newest = socketio.test_client(app, flask_test_client=http, auth={"fork": True})  # a third tab
    assert last(newest, "design_updated")["groups"][0]["expressions"] == ["value"]  # the latest edit's
    exported = http.get(f"/api/design/export?format=json&tab={tab_id}").get_json()
    assert exported["deltas"][0]["modified_modules"] == ["value"]


def test_a_tick_on_a_parent_selects_what_the_method_can_wrap_below_it(server):
    _, client = connect(*server)
    design = last(client, "design_updated")
    group = design["groups"][0]["id"]
    assert "lora cannot wrap" in design["unwrappable"]["encoder.layer.*.attention"]
    assert "encoder.layer.*.attention.self.query" not in design["unwrappable"]
    client.emit("toggle_nodes", {"group_id": group, "paths": ["encoder.layer.*.attention"], "checked": True})
    design = last(client, "design_updated")
    assert design["groups"][0]["modules"] == 4 * 12  # query, key, value and the output dense, 12 layers
    assert design["totals"]["trainable"] == 12 * 4 * 8 * (768 + 768)
    client.emit("toggle_nodes", {"group_id": group, "paths": ["encoder.layer.*.attention"], "checked": False})
    assert last(client, "design_updated")["groups"][0]["modules"] == 0
    client.emit("set_group", {"group_id": group, "method": "adapter"})
    assert last(client, "design_updated")["unwrappable"] == {}  # an adapter goes after any module
    client.emit("toggle_nodes", {"group_id": group, "paths": ["encoder.layer.*.attention"], "checked": True})
    assert last(client, "design_updated")["groups"][0]["expressions"] == ["attention"]


def test_events_carry_sequence_numbers_and_answers_carry_versions(server):
    _, client = connect(*server)
    design = last(client, "design_updated")
    group, version = design["groups"][0]["id"], design["version"]
    query = "encoder.layer.*.attention.self.query"
    client.emit("toggle_nodes", {"group_id": group, "paths": [query], "checked": True, "seq": 1})
    answer = last(client, "design_updated")
    assert answer["seq"] == 1 and answer["version"] > version and answer["server_ms"] >= 0
    assert answer["totals"]["trainable"] == 147_456
    # an event numbered at or below the last one arrived out of order: refused, nothing changes
    for stale in (1, 0):
        client.emit("toggle_nodes", {"group_id": group, "paths": [query], "checked": False, "seq": stale})
        error = last(client, "error")
        assert error["field"] == "seq" and error["seq"] == stale and "came after number 1" in error["message"]
    client.emit("toggle_nodes", {"group_id": group, "paths": [query], "checked": False, "seq": 2 ** 53})
    assert "less than or equal to" in last(client, "error")["message"]
    client.emit("select_group", {"group_id": group, "seq": 2})
    later = last(client, "design_updated")
    assert later["seq"] == 2 and later["version"] > answer["version"]
    assert later["totals"]["trainable"] == 147_456  # the refused unticks changed nothing
    client.emit("undo", {"seq": 7})  # gaps are fine: only the order counts
    assert last(client, "design_updated")["totals"]["trainable"] == 0
    # a second connection to the same session numbers its own events
    app, socketio = server
    again = socketio.test_client(app, flask_test_client=client.flask_test_client)
    again.emit("redo", {"seq": 1})
    assert last(again, "design_updated")["totals"]["trainable"] == 147_456



def test_exports_keep_the_names_typed_until_a_tick_changes_the_selection(server):
    http, client = connect(*server)
    group = last(client, "design_updated")["groups"][0]["id"]
    client.emit("set_expressions", {"group_id": group, "expressions": ["attn.q", "attn.v"]})
    assert last(client, "design_updated")["groups"][0]["expressions"] == ["attn.q", "attn.v"]
    exported = http.get("/api/design/export?format=json").get_json()
    assert exported["deltas"][0]["modified_modules"] == ["attn.q", "attn.v"]
    assert len(exported["deltas"][0]["resolved_modules"]) == 24
    assert http.get("/api/design/export?format=peft").get_json()["target_modules"] == ["query", "value"]
    script = http.get("/api/design/export?format=python").get_data(as_text=True)
    assert '\\"attn.q\\"' in script or '"attn.q"' in script
    # read back (import) it is the same design, typed names included
    assert http.post("/api/design/import", json=exported).status_code == 200
    assert http.get("/api/design").get_json()["groups"][0]["expressions"] == ["attn.q", "attn.v"]
    client.get_received()
    # a tick changes the selection: the names become the compiled expressions of what is ticked
    client.emit("toggle_nodes", {"group_id": last_group(http), "checked": False,
                                 "paths": ["encoder.layer.*.attention.self.value"]})
    assert last(client, "design_updated")["groups"][0]["expressions"] == ["query"]
    client.emit("undo", {})  # undo brings the typed names back with the selection
    assert last(client, "design_updated")["groups"][0]["expressions"] == ["attn.q", "attn.v"]
    # a quick pick's role name that a real module name would take over is shown compiled
    client.emit("set_expressions", {"group_id": last_group(http), "expressions": ["attn.q"], "roles": True})
    assert last(client, "design_updated")["groups"][0]["expressions"] == ["attn.q"]


def last_group(http) -> str:
    return http.get("/api/design").get_json()["groups"][0]["id"]


def test_a_role_name_a_real_module_would_take_over_is_shown_compiled(tmp_path):
    from designer.state import BackboneCache
    from designer.store import SessionStore

    cache = BackboneCache("catalog:t5-base")
    store = SessionStore(tmp_path, cache)
    session = store.get("T" * 24)
    store.use(session, cache.get("catalog:t5-base"))
    group = session.groups[0].id
    session.set_group(group, method="adapter")
    session.set_expressions(group, ["layer_norm"], roles=True)  # the role: every block's norms
    shown = session.snapshot()["groups"][0]
    assert shown["modules"] == 62 and shown["expressions"] == ["layer_norm", "final_layer_norm"]
    session.set_expressions(group, ["layer_norm"])  # typed: T5's modules of that name
    shown = session.snapshot()["groups"][0]
    assert shown["modules"] == 60 and shown["expressions"] == ["layer_norm"]
