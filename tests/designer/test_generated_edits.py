"""Generated edit sequences on the designer's session — ticks, typed expressions, hyper-parameters,
groups added and removed, undo and redo, imports — checked after every step against a small
independent reference: a plain set of module paths per group and a hand formula per method for
the counts, the percent, the full/partial marks and the JSON export.

``make test`` runs a fixed set of sequences; ``make fuzz`` many random ones.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from designer.app import create_app
from designer.exports import export
from designer.payloads import PayloadError
from designer.store import new_session_id
from engine import Design, load_backbone

EXAMPLES = 300 if os.environ.get("DELTA_HYPOTHESIS_PROFILE") == "fuzz" else 25
BACKBONE_PARAMETERS = 109_482_240  # bert-base-uncased's BertModel
LAYERS = range(12)
#: folded node → (in, out) features of its Linear modules
NODES = {
    "encoder.layer.*.attention.self.query": (768, 768),
    "encoder.layer.*.attention.self.value": (768, 768),
    "encoder.layer.*.attention.output.dense": (768, 768),
    "encoder.layer.*.intermediate.dense": (768, 3072),
    "encoder.layer.*.output.dense": (3072, 768),
}
#: typed expression → the module paths it selects (written out by hand, not by the engine)
TYPED = {
    "query": {f"encoder.layer.{i}.attention.self.query" for i in LAYERS},
    "intermediate.dense": {f"encoder.layer.{i}.intermediate.dense" for i in LAYERS},
    r"[r]encoder\.layer\.[0-3]\.attention\.self\.value": {f"encoder.layer.{i}.attention.self.value" for i in range(4)},
    "attention.output.dense": {f"encoder.layer.{i}.attention.output.dense" for i in LAYERS},
}
MODULE_PATHS = [name for name, _ in load_backbone("catalog:bert-base-uncased").model.named_modules() if name]
SIZES = {("lora", "lora_r"): [1, 4, 8], ("adapter", "bottleneck_dim"): [8, 24]}


def members(node: str) -> set[str]:
    return {node.replace("*", str(i)) for i in LAYERS}


def features(path: str) -> tuple[int, int]:
    return NODES[re.sub(r"\.\d+\.", ".*.", path, count=1)]


def trainable(group: dict[str, Any]) -> int:
    """LoRA: r·(in + out); adapter after the module: out·b + b + b·out + out."""
    total = 0
    for path in group["paths"]:
        inputs, outputs = features(path)
        size = group["size"]
        total += size * (inputs + outputs) if group["method"] == "lora" else 2 * outputs * size + size + outputs
    return total


operations = st.one_of(
    st.tuples(st.just("tick"), st.integers(0, 3), st.sampled_from(sorted(NODES)), st.booleans()),
    st.tuples(st.just("type"), st.integers(0, 3), st.lists(st.sampled_from(sorted(TYPED)), min_size=1, max_size=3,
                                                           unique=True)),
    st.tuples(st.just("size"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("add"), st.sampled_from(["lora", "adapter"])),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("undo")),
    st.tuples(st.just("redo")),
    st.tuples(st.just("import"), st.sampled_from(sorted(NODES)), st.sampled_from(["lora", "adapter"])),
)


class Reference:
    """The design as plain data, with its own undo and redo."""

    def __init__(self) -> None:
        self.groups: list[dict[str, Any]] = [{"method": "lora", "size": 8, "paths": set()}]
        self.undos: list[list[dict[str, Any]]] = []
        self.redos: list[list[dict[str, Any]]] = []

    def edit(self, groups: list[dict[str, Any]]) -> None:
        if groups != self.groups:
            self.undos.append(copy.deepcopy(self.groups))
            self.redos.clear()
            self.groups = groups


def apply(session: Any, reference: Reference, operation: tuple) -> None:
    """One edit on the session and the same on the reference (a refused edit changes neither)."""
    kind = operation[0]
    groups = copy.deepcopy(reference.groups)
    ids = [g.id for g in session.groups]
    if kind in ("tick", "type", "size", "remove") and operation[1] >= len(ids):
        return
    if kind == "tick":
        _, index, node, checked = operation
        session.toggle_nodes(ids[index], [node], checked)
        groups[index]["paths"] = groups[index]["paths"] | members(node) if checked else groups[index]["paths"] - members(node)
        groups[index]["paths"] = set(groups[index]["paths"])
    elif kind == "type":
        _, index, typed = operation
        session.set_expressions(ids[index], typed)
        groups[index]["paths"] = set().union(*(TYPED[t] for t in typed))
    elif kind == "size":
        _, index, choice = operation
        method = groups[index]["method"]
        name, values = next((key[1], v) for key, v in SIZES.items() if key[0] == method)
        session.set_group(ids[index], hyperparameters={name: values[choice]})
        groups[index]["size"] = values[choice]
    elif kind == "add":
        session.add_group(operation[1])
        groups.append({"method": operation[1], "size": 8 if operation[1] == "lora" else 24, "paths": set()})
    elif kind == "remove":
        session.remove_group(ids[operation[1]])
        del groups[operation[1]]
    elif kind == "import":
        _, node, method = operation
        session.import_design(Design.from_dict({"format": "delta-design/1", "deltas": [
            {"delta_type": method, "name": "imported", "modified_modules": sorted(members(node))}]}))
        groups = [{"method": method, "size": 8 if method == "lora" else 24, "paths": members(node)}]
    elif kind in ("undo", "redo"):
        source, target = (reference.undos, reference.redos) if kind == "undo" else (reference.redos, reference.undos)
        try:
            getattr(session, kind)()
        except PayloadError:
            assert not source  # refused only when the reference has nothing either
            return
        assert source, f"the session could {kind} but the reference cannot"
        target.append(copy.deepcopy(reference.groups))
        reference.groups = source.pop()
        return
    reference.edit(groups)


def check(session: Any, reference: Reference) -> None:
    snapshot = session.snapshot()
    rows = snapshot["groups"]
    assert [(r["method"], r["hyperparameters"].get("lora_r", r["hyperparameters"].get("bottleneck_dim")))
            for r in rows] == [(g["method"], g["size"]) for g in reference.groups]
    expected = [trainable(g) for g in reference.groups]
    assert [r["trainable"] for r in rows] == expected
    assert snapshot["totals"]["trainable"] == sum(expected)
    assert snapshot["totals"]["percent"] == pytest.approx(100 * sum(expected) / BACKBONE_PARAMETERS, rel=1e-12)
    for row, group in zip(rows, reference.groups):
        for node in NODES:
            hits = len(members(node) & group["paths"])
            want = "full" if hits == len(LAYERS) else "partial" if hits else None
            assert snapshot["marks"].get(node, {}).get(row["id"]) == want, (node, row["id"])
    document = json.loads(export(session, "json")[2])
    nonempty = [g for g in reference.groups if g["paths"]]
    assert [set(d["resolved_modules"]) for d in document["deltas"]] == [g["paths"] for g in nonempty]
    assert [d["trainable_parameters"] for d in document["deltas"]] == [trainable(g) for g in nonempty]
    assert document["totals"]["trainable_parameters"] == sum(expected)
    script = export(session, "python")[2]
    assert json.loads(ast.literal_eval(re.search(r"DESIGN = json\.loads\((.*?)\)\n", script, re.S).group(1))) \
        == document
    if len(nonempty) == 1 and nonempty[0]["method"] == "lora":  # PEFT's own matcher reads the export
        peft = json.loads(export(session, "peft")[2])
        config = LoraConfig(r=peft["r"], target_modules=peft["target_modules"],
                            layers_to_transform=peft.get("layers_to_transform"),
                            layers_pattern=peft.get("layers_pattern"))
        assert peft["r"] == nonempty[0]["size"]
        assert {p for p in MODULE_PATHS if check_target_module_exists(config, p)} == nonempty[0]["paths"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, _ = create_app({"BACKBONE": "catalog:bert-base-uncased", "WORKSPACE": str(tmp_path_factory.mktemp("ws"))})
    return app


@pytest.mark.generated
@settings(max_examples=EXAMPLES)
@given(sequence=st.lists(operations, min_size=1, max_size=12))
def test_edit_sequences_match_an_independent_reference(app, sequence):
    store = app.extensions["delta_designer"]
    session = store.get(new_session_id())
    store.use(session, store.backbones.get("catalog:bert-base-uncased"))
    reference = Reference()
    with app.app_context():  # the Python export renders a template
        check(session, reference)
        for operation in sequence:
            apply(session, reference, operation)
            check(session, reference)
