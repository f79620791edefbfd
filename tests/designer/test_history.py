"""Never lose work: undo/redo of every design edit, and a design kept per backbone so switching
away and back restores it (also after a restart, from the autosave)."""

from __future__ import annotations

import json

import pytest

from designer.app import create_app
from designer.history import MAX_UNDO
from designer.payloads import PayloadError
from designer.store import new_session_id
from engine import Design


@pytest.fixture()
def store(tmp_path):
    app, _ = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    return app.extensions["delta_designer"]


def _session(store, source="catalog:bert-base-uncased"):
    session = store.get(new_session_id())
    store.use(session, store.backbones.get(source))
    return session


def _design(session):
    snapshot = session.snapshot()
    return [(g["name"], g["method"], tuple(g["expressions"])) for g in snapshot["groups"]], snapshot["totals"]["trainable"]


def test_every_kind_of_edit_undoes_and_redoes(store):
    session = _session(store)
    group = session.groups[0].id
    states = [_design(session)]
    edits = [
        lambda: session.set_expressions(group, ["query"]),
        lambda: session.toggle_nodes(group, ["encoder.layer.*.attention.self.value"], True),
        lambda: session.set_layers(group, "encoder.layer.*", "0-5"),
        lambda: session.set_group(group, hyperparameters={"lora_r": 4}),
        lambda: session.add_group("adapter"),
        lambda: session.set_group(session.groups[-1].id, name="my_adapter"),
        lambda: session.set_dtype("float32"),
        lambda: session.import_design(Design.from_dict({"format": "delta-design/1", "deltas": [
            {"delta_type": "ia3", "name": "imported", "modified_modules": ["key"]}]})),
        lambda: session.remove_group(session.groups[0].id),
    ]
    for edit in edits:
        edit()
        states.append(_design(session))
        assert session.snapshot()["history"] == {"undo": len(states) - 1, "redo": 0}
    for expected in reversed(states[:-1]):
        session.undo()
        assert _design(session) == expected
    with pytest.raises(PayloadError, match="nothing to undo"):
        session.undo()
    for expected in states[1:]:
        session.redo()
        assert _design(session) == expected
    with pytest.raises(PayloadError, match="nothing to redo"):
        session.redo()


def test_a_new_edit_after_undo_drops_the_redo_and_selecting_a_group_is_no_edit(store):
    session = _session(store)
    group = session.groups[0].id
    session.set_expressions(group, ["query"])
    session.add_group("bitfit")
    session.select_group(group)  # focus moved: nothing to undo for it
    assert session.snapshot()["history"] == {"undo": 2, "redo": 0}
    session.undo()
    session.set_expressions(group, ["value"])
    assert session.snapshot()["history"] == {"undo": 2, "redo": 0}
    with pytest.raises(PayloadError, match="nothing to redo"):
        session.redo()
    for _ in range(MAX_UNDO + 20):  # bounded: the oldest edits are forgotten
        session.set_group(group, hyperparameters={"lora_r": 2 + _ % 3})
    assert session.snapshot()["history"]["undo"] == MAX_UNDO


def test_switching_backbones_keeps_each_design(store, tmp_path):
    session = _session(store)
    group = session.groups[0].id
    session.set_expressions(group, ["query", "value"])
    session.add_group("adapter")
    on_bert = _design(session)
    store.use(session, store.backbones.get("arch:gpt2"))
    assert [(m, e) for _, m, e in _design(session)[0]] == [("lora", ())]  # a fresh design on the other backbone
    session.set_expressions(session.groups[0].id, ["c_attn"])
    on_gpt2 = _design(session)
    store.use(session, store.backbones.get("catalog:bert-base-uncased"))
    assert _design(session) == on_bert
    saved = json.loads((tmp_path / "sessions" / f"{session.id}.json").read_text())
    assert list(saved["shelf"]) == ["arch:gpt2"]
    restarted_app, _ = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path)})
    restarted = restarted_app.extensions["delta_designer"]
    again = restarted.get(session.id)  # restored from its autosave, shelf included
    assert _design(again) == on_bert
    restarted.use(again, restarted.backbones.get("arch:gpt2"))
    assert _design(again) == on_gpt2


def test_the_first_edit_of_a_first_visit_is_undoable(store):
    session = store.get(new_session_id())
    store.use(session, store.backbones.get("catalog:bert-base-uncased"), autosave=False)  # as a first visit
    fresh = _design(session)
    session.set_expressions(session.groups[0].id, ["query"])
    session.undo()
    assert _design(session) == fresh
