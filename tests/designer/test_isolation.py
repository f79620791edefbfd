"""Sessions share one backbone (and one weight-free twin) per source: a build or import that fails
in one session must leave nothing behind for the others, and concurrent ones must not collide."""

from __future__ import annotations

import threading

import pytest
from torch import nn

from designer.app import create_app
from engine import DeltaModule
from engine.methods.adapter import AdapterModel

BACKBONE = "arch:bert"


def _design(*groups: tuple[str, str, list[str]]) -> dict:
    return {"format": "delta-design/1", "deltas": [
        {"delta_type": method, "name": name, "modified_modules": modules} for name, method, modules in groups]}


@pytest.fixture()
def app(tmp_path):
    app, _ = create_app({"BACKBONE": BACKBONE, "WORKSPACE": str(tmp_path)})
    return app


def _client(app):
    client = app.test_client()
    assert client.get("/").status_code == 200
    return client


def _delta_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, DeltaModule)]


def test_a_failed_build_leaves_the_shared_model_and_other_sessions_unchanged(app, monkeypatch):
    one, other = _client(app), _client(app)
    assert other.post("/api/design/import", json=_design(("lora", "lora", ["attn.q"]))).status_code == 200
    before_preview = _shown(other)
    before_build = other.post("/api/design/build").get_json()
    loaded = app.extensions["delta_designer"].backbones.cached(BACKBONE)
    flags = {n: p.requires_grad for n, p in loaded.backbone.model.named_parameters()}

    assert one.post("/api/design/import", json=_design(
        ("lora", "lora", ["attn.q"]), ("adapter", "adapter", ["ff.w2"]))).status_code == 200
    original = AdapterModel.attach

    def fails(self):  # the second delta of the design fails after the first is attached
        original(self)
        raise RuntimeError("out of memory while attaching")

    monkeypatch.setattr(AdapterModel, "attach", fails)
    assert one.post("/api/design/build").status_code == 500  # answered, nothing internal shown
    monkeypatch.setattr(AdapterModel, "attach", original)

    model = loaded.backbone.model
    assert _delta_modules(model) == [] and _delta_modules(loaded.twin) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _shown(other) == before_preview
    assert other.post("/api/design/build").get_json() == before_build
    assert one.post("/api/design/build").status_code == 200  # the failed session builds again too


def _shown(client) -> dict:
    """The design a session shows, without its version (each answer counts one up)."""
    return {k: v for k, v in client.get("/api/design").get_json().items() if k != "version"}


def test_an_import_never_attaches_anything_to_the_shared_twin(app, monkeypatch):
    client = _client(app)
    loaded = app.extensions["delta_designer"].backbones.cached(BACKBONE)
    attached = []
    monkeypatch.setattr(DeltaModule, "__init__", lambda self, *a, **k: (attached.append(1), nn.Module.__init__(self))[1])
    response = client.post("/api/design/import", json={**_design(("lora", "lora", ["attn.q"])), "deltas": [
        {"delta_type": "lora", "name": "lora", "modified_modules": ["attn.q"], "resolved_modules": ["nowhere"]}]})
    assert response.status_code == 400 and "resolves to other modules" in response.get_json()["error"]
    assert _delta_modules(loaded.twin) == [] and attached == []  # planned only: nothing built


def test_sessions_importing_and_building_at_once_each_get_their_own_answer(app):
    designs = [_design(("lora", "lora", ["attn.q"])), _design(("lora", "lora", ["attn.q", "attn.v"])),
               _design(("adapter", "adapter", ["ff.w2"])), _design(("bitfit", "bitfit", ["layer_norm"]))]
    clients = [_client(app) for _ in designs]
    expected = []
    for client, design in zip(clients, designs):  # each alone first
        client.post("/api/design/import", json=design)
        expected.append(client.post("/api/design/build").get_json()["trainable"])
    failures: list[str] = []

    def work(index: int) -> None:
        for _ in range(6):
            imported = clients[index].post("/api/design/import", json=designs[index])
            built = clients[index].post("/api/design/build")
            if imported.status_code != 200 or built.status_code != 200:
                failures.append(f"{index}: {imported.status_code} {built.status_code}")
            elif built.get_json()["trainable"] != expected[index]:
                failures.append(f"{index}: {built.get_json()['trainable']} != {expected[index]}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(designs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    loaded = app.extensions["delta_designer"].backbones.cached(BACKBONE)
    assert _delta_modules(loaded.backbone.model) == [] and _delta_modules(loaded.twin) == []


def test_a_design_larger_than_its_backbone_is_refused_before_anything_is_allocated(app):
    client = _client(app)
    design = _design(("lora", "lora", ["attn.q"]))
    design["deltas"][0]["lora_r"] = 100_000
    assert client.post("/api/design/import", json=design).status_code == 200
    refused = client.post("/api/design/build")
    assert refused.status_code == 400 and refused.get_json()["field"] == "build"
    assert "more than the whole backbone" in refused.get_json()["error"]
    loaded = app.extensions["delta_designer"].backbones.cached(BACKBONE)
    assert _delta_modules(loaded.backbone.model) == []


def test_a_memory_plan_attaches_nothing_the_sessions_share_and_is_memoised(app, monkeypatch):
    one, other = _client(app), _client(app)
    assert one.post("/api/design/import", json=_design(("lora", "lora", ["attn.q"]))).status_code == 200
    assert other.post("/api/design/import", json=_design(("adapter", "adapter", ["ff.w2"]))).status_code == 200
    before = _shown(other)
    loaded = app.extensions["delta_designer"].backbones.cached(BACKBONE)
    flags = {n: p.requires_grad for n, p in loaded.twin.named_parameters()}
    body = {"gpu_bytes": 24 * 2**30, "batch": 2, "sequence": 64}
    plan = one.post("/api/memory-plan", json=body).get_json()
    assert plan["trainable"] == one.get("/api/design").get_json()["totals"]["trainable"] > 0
    assert _delta_modules(loaded.twin) == [] and _delta_modules(loaded.planning_model()) == []
    assert {n: p.requires_grad for n, p in loaded.twin.named_parameters()} == flags
    assert _shown(other) == before
    traced = []
    monkeypatch.setattr("designer.memory_api.trace_activations", lambda *a: traced.append(a))
    assert one.post("/api/memory-plan", json=body).get_json() == plan and traced == []  # memoised
    # a failing trace leaves nothing attached either
    monkeypatch.setattr("designer.memory_api.trace_activations", lambda *a: 1 / 0)
    assert one.post("/api/memory-plan", json={**body, "batch": 3}).status_code == 500
    assert _delta_modules(loaded.planning_model()) == []
    monkeypatch.undo()
    assert other.post("/api/memory-plan", json=body).get_json()["trainable"] != plan["trainable"]
