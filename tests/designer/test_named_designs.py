"""Named designs in the workspace: save, list, open, rename, duplicate, delete — bounded names and
counts, unreadable files listed (never a crash), a design for another backbone refused by name."""

from __future__ import annotations

import json

import pytest

from designer import named
from designer.app import create_app

QV = {"format": "delta-design/1", "deltas": [
    {"delta_type": "lora", "name": "lora_qv", "modified_modules": ["query", "value"]}]}
KEY = {"format": "delta-design/1", "deltas": [{"delta_type": "ia3", "name": "scales", "modified_modules": ["key"]}]}


@pytest.fixture()
def client(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    http = app.test_client()
    assert http.get("/").status_code == 200
    return http


def _expressions(http) -> list[list[str]]:
    return [g["expressions"] for g in http.get("/api/design").get_json()["groups"]]


def test_save_list_open_rename_duplicate_delete(client):
    assert client.post("/api/design/import", json=QV).status_code == 200
    listed = client.post("/api/designs", json={"name": "qv"}).get_json()["designs"]
    assert listed == [{"name": "qv", "readable": True, "source": "catalog:bert-base-uncased", "deltas": 1,
                       "trainable": 294_912}]
    client.post("/api/design/import", json=KEY)
    assert _expressions(client) == [["key"]]
    assert client.post("/api/designs/qv/open").status_code == 200
    assert _expressions(client) == [["query", "value"]]
    names = [d["name"] for d in client.post("/api/designs/qv/duplicate", json={"new_name": "qv-copy"}).get_json()["designs"]]
    assert names == ["qv", "qv-copy"]
    names = [d["name"] for d in client.post("/api/designs/qv-copy/rename", json={"new_name": "qv.2"}).get_json()["designs"]]
    assert names == ["qv", "qv.2"]
    assert [d["name"] for d in client.delete("/api/designs/qv.2").get_json()["designs"]] == ["qv"]
    refused = client.post("/api/designs", json={"name": "qv"})
    assert refused.status_code == 400 and "exists" in refused.get_json()["error"]
    client.post("/api/design/import", json=KEY)
    assert client.post("/api/designs", json={"name": "qv", "replace": True}).status_code == 200
    client.post("/api/designs/qv/open")
    assert _expressions(client) == [["key"]]


@pytest.mark.parametrize("name", ["", "../escape", ".hidden", "a" * 65, "x.json", "sp ace", 7, None])
def test_bad_names_are_refused_naming_the_rule(client, name):
    response = client.post("/api/designs", json={"name": name})
    assert response.status_code == 400 and "a design name is 1–64 letters" in response.get_json()["error"]
    assert client.get("/api/designs").get_json()["designs"] == []


def test_the_number_of_designs_is_bounded(client, monkeypatch):
    monkeypatch.setattr(named, "MAX_DESIGNS", 2)
    for name in ("a", "b"):
        assert client.post("/api/designs", json={"name": name}).status_code == 200
    response = client.post("/api/designs", json={"name": "c"})
    assert response.status_code == 400 and "at most 2 designs" in response.get_json()["error"]


def test_unreadable_files_are_listed_and_other_backbones_refused(client, tmp_path):
    client.post("/api/design/import", json=QV)
    client.post("/api/designs", json={"name": "good"})
    designs = tmp_path / "designs"
    (designs / "broken.json").write_text('{"format": "delta-design/1", "deltas": [')
    (designs / "other.json").write_text(json.dumps({**QV, "backbone": {"source": "catalog:gpt2"}}))
    listed = {d["name"]: d for d in client.get("/api/designs").get_json()["designs"]}
    assert listed["broken"]["readable"] is False and "Expecting" in listed["broken"]["error"]
    assert listed["good"]["readable"] and listed["other"]["source"] == "catalog:gpt2"
    response = client.post("/api/designs/broken/open")
    assert response.status_code == 400 and "unreadable" in response.get_json()["error"]
    client.post("/api/design/import", json=KEY)
    response = client.post("/api/designs/other/open")
    assert response.status_code == 400 and "made for catalog:gpt2" in response.get_json()["error"]
    assert _expressions(client) == [["key"]]  # nothing changed
    assert client.post("/api/designs/nothing/open").status_code == 400


def test_two_saved_designs_compare_side_by_side(client):
    client.post("/api/design/import", json=QV)
    client.post("/api/designs", json={"name": "qv"})
    both = {"format": "delta-design/1", "deltas": [
        {"delta_type": "lora", "name": "lora_qk", "modified_modules": ["query", "key"], "lora_r": 4},
        {"delta_type": "adapter", "name": "adapters", "modified_modules": ["output.dense"]}]}
    client.post("/api/design/import", json=both)
    client.post("/api/designs", json={"name": "qk-adapters"})
    result = client.get("/api/designs/compare?a=qv&b=qk-adapters").get_json()
    assert result["a"]["totals"]["trainable"] == 294_912
    assert [g["name"] for g in result["b"]["groups"]] == ["lora_qk", "adapters"]
    assert result["b"]["groups"][0]["trainable"] == 147_456  # r=4 on query and key, 12 layers
    assert result["a"]["totals"]["checkpoint_bytes"] == 4 * 294_912
    assert result["diff"] == {"only_a": 12, "only_b": 12 + 24, "both": 12}  # value; key + output.dense ×2; query
    assert result["modules"]["both"][0] == "encoder.layer.0.attention.self.query"
    marks = result["marks"]
    assert marks["encoder.layer.*.attention.self.query"] == "both"
    assert marks["encoder.layer.*.attention.self.value"] == "only-a"
    assert marks["encoder.layer.*.attention.self.key"] == "only-b"
    assert _expressions(client) == [["query", "key"], ["output.dense"]]  # the tab's design untouched
    for query, message in (("a=qv&b=qv", "two different"), ("a=qv", "two different"),
                           ("a=qv&b=missing", "no saved design 'missing'")):
        response = client.get(f"/api/designs/compare?{query}")
        assert response.status_code == 400 and message in response.get_json()["error"]


def test_peft_default_targets_and_their_difference_from_the_design(client):
    client.post("/api/design/import", json={"format": "delta-design/1", "deltas": [
        {"delta_type": "lora", "name": "q_and_dense", "modified_modules": ["query", "attention.output.dense"]}]})
    found = client.get("/api/peft-defaults").get_json()
    assert found["source"] == "PEFT's default target_modules for model type 'bert'"  # PEFT's own mapping
    assert found["count"] == 24 and found["marks"] == {"encoder.layer.*.attention.self.query": "all",
                                                         "encoder.layer.*.attention.self.value": "all"}
    assert (found["in_design"], found["not_in_design"], found["design_only"]) == (12, 12, 12)


def test_a_hand_made_saved_design_is_held_to_the_import_bounds(client, tmp_path):
    client.post("/api/design/import", json=QV)
    client.post("/api/designs", json={"name": "fine"})
    huge = {"format": "delta-design/1", "deltas": [
        {"delta_type": "lora", "name": f"d{i}", "modified_modules": ["query"]} for i in range(5000)]}
    (tmp_path / "designs" / "huge.json").write_text(json.dumps(huge))
    for response in (client.post("/api/designs/huge/open"), client.get("/api/designs/compare?a=fine&b=huge")):
        assert response.status_code == 400 and "deltas" in response.get_json()["error"]
    assert _expressions(client) == [["query", "value"]]
