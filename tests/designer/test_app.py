import re

import pytest

from designer.app import create_app
from designer.security import CONTENT_SECURITY_POLICY, is_loopback
from tests.designer.evil_models import EVIL_NAME


@pytest.fixture()
def client(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    return app.test_client()


def test_nothing_is_loaded_until_first_request(tmp_path):
    app, socketio = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    assert app.extensions["delta_designer"].backbones.cached("catalog:gpt2") is None
    assert socketio is not None
    assert not (tmp_path / "sessions").exists()


def test_page_shows_the_backbone_and_sets_a_session_cookie(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'data-backbone-parameters="124439808"' in html
    assert "delta_designer_session=" in response.headers["Set-Cookie"]
    assert "HttpOnly" in response.headers["Set-Cookie"]
    tree = client.get("/api/tree").get_json()["tree"]
    paths = [c["path"] for c in tree["root"]["children"][0]["children"][3]["children"]]
    assert paths == ["transformer.h.*"]  # folded


def test_page_has_a_strict_csp_and_no_inline_script(client):
    response = client.get("/")
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    html = response.get_data(as_text=True)
    for tag in re.findall(r"<script[^>]*>", html):
        assert "src=" in tag, tag
    assert re.search(r"<script[^>]*>\s*[^<\s]", html) is None  # no inline script bodies
    assert re.search(r"\son[a-z]+\s*=", html) is None  # no inline event handlers


def test_api_tree_and_health(client):
    assert client.get("/api/health").get_json() == {
        "status": "ok", "backbone": {"source": "catalog:gpt2", "state": "not loaded"}}
    client.get("/")
    assert client.get("/api/health").get_json()["backbone"]["state"] == "ready"
    payload = client.get("/api/tree").get_json()
    assert payload["backbone"]["class_name"] == "GPT2LMHeadModel"
    assert payload["backbone"]["is_meta"] is True
    assert payload["tree"]["total_parameters"] == 124_439_808


def test_socketio_client_is_served_from_node_modules(client):
    response = client.get("/vendor/socket.io/socket.io.esm.min.js")
    assert response.status_code == 200
    assert b"io" in response.data[:2000] or len(response.data) > 10_000


def test_module_names_travel_as_data_never_as_markup(tmp_path):
    app, _ = create_app({"BACKBONE": "python:tests.designer.evil_models:evil", "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    html = client.get("/").get_data(as_text=True)
    assert EVIL_NAME not in html
    names = [c["name"] for c in client.get("/api/tree").get_json()["tree"]["root"]["children"]]
    assert names[0] == EVIL_NAME  # the browser inserts it with textContent (tests/e2e)


def test_token_is_required_when_set(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:gpt2", "TOKEN": "s3cret", "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    denied = client.get("/api/health")
    assert denied.status_code == 403
    assert "access token" in denied.get_json()["error"]
    assert client.get("/api/health?token=wrong").status_code == 403
    exchanged = client.get("/api/health?token=s3cret&x=1")
    assert exchanged.status_code == 303 and exchanged.headers["Location"] == "/api/health?x=1"
    assert "delta_designer_token=s3cret" in exchanged.headers["Set-Cookie"]
    assert "HttpOnly" in exchanged.headers["Set-Cookie"]
    assert client.get("/api/health").status_code == 200  # the cookie set above
    assert app.test_client().get(
        "/api/health", headers={"X-Delta-Designer-Token": "s3cret"}
    ).status_code == 200


def test_unknown_route_is_a_json_404(client):
    response = client.get("/api/nothing")
    assert response.status_code == 404 and "error" in response.get_json()


def test_a_backbone_that_fails_to_load_is_a_clear_400(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:nope", "WORKSPACE": str(tmp_path)})
    response = app.test_client().get("/")
    assert response.status_code == 400
    assert "unknown catalog shape 'nope'" in response.get_json()["error"]


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("192.168.1.4", False), ("example.org", False)],
)
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_rest_bodies_are_validated_with_clear_400s(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    client = app.test_client()
    assert client.get("/api/design/export?format=json").status_code == 400  # no session yet
    client.get("/")
    cases = [
        (client.post("/api/design/import", data="{not json", content_type="application/json"), "delta-design/1"),
        (client.post("/api/design/import", json=[1, 2]), "delta-design/1"),
        (client.post("/api/design/import", json={"format": "other"}), "delta-design/1"),
        (client.post("/api/design/import", json={"format": "delta-design/1", "deltas": [{"delta_type": "nope"}]}),
         "unknown delta_type 'nope'"),
        (client.post("/api/design/import", json={"format": "delta-design/1", "deltas": [
            {"delta_type": "lora", "modified_modules": ["qeury"]}]}), "'qeury' matches no module"),
        (client.get("/api/design/export?format=xml"), "export format must be one of json, python, peft"),
        (client.get("/api/design/export?format=peft"), "PEFT holds one adapter per config; this design has 0"),
    ]
    for response, message in cases:
        assert response.status_code == 400, response.get_json()
        assert message in response.get_json()["error"]
        assert "Traceback" not in response.get_data(as_text=True)
    assert client.get("/api/health").status_code == 200


def test_serving_beyond_loopback_requires_a_printed_token(monkeypatch, capsys, tmp_path):
    from flask_socketio import SocketIO

    from designer import production
    from designer.cli import main

    seen = {}
    monkeypatch.setattr(SocketIO, "run", lambda self, app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(production, "serve", lambda build, host, port: seen.update(
        app=build(), host=host, port=port, server="gunicorn"))
    main(["serve", "--host", "0.0.0.0", "--port", "5123", "--backbone", "catalog:gpt2",
          "--workspace", str(tmp_path)])
    assert seen["server"] == "gunicorn" and (seen["host"], seen["port"]) == ("0.0.0.0", 5123)
    token = seen["app"].config["TOKEN"]
    assert token and len(token) > 20
    assert f"http://0.0.0.0:5123/?token={token}" in capsys.readouterr().out
    main(["serve", "--backbone", "catalog:gpt2", "--workspace", str(tmp_path)])
    assert seen["app"].config["TOKEN"] is None and seen["host"] == "127.0.0.1"


def test_building_an_empty_design_is_an_error_not_the_whole_backbone(client):
    client.get("/")
    response = client.post("/api/design/build", data="{}", content_type="application/json")
    assert response.status_code == 400
    body = response.get_json()
    assert body["type"] == "ConfigError" and "no delta and unfreezes no module" in body["error"]


def test_the_shared_preview_memo_stays_consistent_under_threads():
    import threading

    from designer.preview import _LRU

    memo, barrier = _LRU(size=50), threading.Barrier(8)
    wrong: list[tuple[int, int]] = []

    def work(index: int) -> None:
        barrier.wait()
        for key in range(400):
            value = memo.get(key % 120, lambda k=key % 120: k * 7)
            if value != (key % 120) * 7:
                wrong.append((key, value))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong and len(memo.items) == 50


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:5000", True), ("localhost:5000", True), ("[::1]:5000", True),
    ("attacker.example:5000", False), ("attacker.example", False), ("127.0.0.1.nip.io:5000", False),
    ("", False)])
def test_loopback_answers_only_to_loopback_host_names(tmp_path, host, allowed):
    """DNS rebinding: a page on attacker.example resolved to 127.0.0.1 sends its own Host."""
    app, _ = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path)})
    response = app.test_client().get("/api/health", headers={"Host": host})
    assert response.status_code == (200 if allowed else 400)
    if not allowed:
        assert "does not answer to the host" in response.get_json()["error"]


def test_every_interface_answers_to_ip_literals_and_named_hosts_only():
    from designer.security import HostPolicy

    policy = HostPolicy.for_bind("0.0.0.0", ("designer.lab.internal",))
    assert policy.allows("10.1.2.3:5000") and policy.allows("[fe80::1]:5000")
    assert policy.allows("designer.lab.internal:5000") and policy.allows("localhost")
    assert not policy.allows("attacker.example:5000")
    one = HostPolicy.for_bind("10.1.2.3")
    assert one.allows("10.1.2.3:80") and not one.allows("10.9.9.9:80") and not one.allows("localhost")


def test_the_token_never_reaches_the_log():
    import logging

    from designer.security import RedactTokens

    record = logging.LogRecord("werkzeug", logging.INFO, "", 0, '%s - - "%s" %s', (
        "127.0.0.1", "GET /?token=s3cret&x=1 HTTP/1.1", "303"), None)
    RedactTokens().filter(record)
    assert "s3cret" not in record.getMessage() and "token=[redacted]&x=1" in record.getMessage()


def test_the_tree_filter_speaks_the_expression_grammar_and_class_names(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:llama-3.1-405b", "WORKSPACE": str(tmp_path)})
    http = app.test_client()
    http.get("/")

    def found(text: str) -> list[str]:
        response = http.get("/api/tree/filter", query_string={"q": text})
        assert response.status_code == 200, response.get_json()
        return response.get_json()["nodes"]

    assert found("attn.q") == found("q_proj") == ["model.layers.*.self_attn.q_proj"]
    assert found(r"[r]layers\.(6[3-9]|[7-9]\d|1[0-1]\d|12[0-5])\.mlp") == ["model.layers.*.mlp"]
    assert found("LlamaRMSNorm") == ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm",
                                     "model.norm"]
    assert found("[r]Llama(MLP|Attention)") == ["model.layers.*.self_attn", "model.layers.*.mlp"]
    assert found("  ") == []
    for text, message in (("[r](oops", "'[r](oops' is not a regex RE2 can run"),
                          ("q_prj", "the closest existing names are: q_proj"),
                          ("x" * 1001, "a filter has at most 1000 characters")):
        refused = http.get("/api/tree/filter", query_string={"q": text})
        assert refused.status_code == 400 and message in refused.get_json()["error"]
        assert refused.get_json()["field"] == "search"
