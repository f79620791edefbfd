"""The backbone cache keeps loaded backbones within a memory budget, least recently used first
out, and never drops one a session has open or the server's own."""

from __future__ import annotations

from designer.app import create_app
from designer.state import BackboneCache


def test_least_recently_used_backbones_no_session_has_open_are_evicted():
    evicted: list[str] = []
    cache = BackboneCache("catalog:gpt2", budget_bytes=1, on_evict=lambda loaded: evicted.append(loaded.source))
    server = cache.get("catalog:gpt2")
    first = cache.get("arch:bert")
    assert cache.cached("arch:bert") is first and cache.cached("catalog:gpt2") is server  # the newest stays
    cache.get("arch:t5")
    assert evicted == ["arch:bert"]  # over budget: the oldest that is not the server's own
    assert cache.cached("arch:bert") is None and cache.cached("catalog:gpt2") is server


def test_a_backbone_a_session_has_open_is_kept_over_budget(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:gpt2", "WORKSPACE": str(tmp_path), "BACKBONE_BUDGET_BYTES": 1})
    store = app.extensions["delta_designer"]
    client = app.test_client()
    client.get("/")
    session = next(iter(store._sessions.values()))
    store.use(session, store.backbones.get("arch:bert"))  # this session now has bert open
    store.backbones.get("arch:t5")
    store.backbones.get("arch:gpt2")
    assert store.backbones.cached("arch:bert") is session.loaded  # open: kept
    assert store.backbones.cached("arch:t5") is None  # nobody had it open: evicted
    assert set(store._previewers) == {id(session.loaded), id(store.backbones.cached("catalog:gpt2"))}


def test_memory_counts_real_tensors_and_every_module(tmp_path):
    cache = BackboneCache("minilm")
    real = cache.get("minilm")
    meta = cache.get("arch:bert")
    assert real.memory_bytes > 90_000_000 > meta.memory_bytes > 0
