import json

import pytest
import torch

from engine import ConfigError, Design, DesignMismatchError, load_backbone
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import tiny_inputs, tiny_model

DOCUMENT = {
    "format": "delta-design/1",
    "backbone": {"source": "catalog:bert-base-uncased", "class": "BertModel", "parameters": 109482240},
    "deltas": [
        {"name": "lora_qv", "delta_type": "lora", "route": "parallel",
         "modified_modules": ["query", "value"], "exclude_modules": [],
         "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        {"name": "adapter_ff", "delta_type": "adapter", "modified_modules": ["ff.w2"],
         "bottleneck_dim": 16},
        {"name": "bitfit_ln", "delta_type": "bitfit", "modified_modules": ["LayerNorm"]},
    ],
    "unfrozen_modules": ["pooler"],
}


def test_design_builds_several_deltas_and_unfreezes_modules_with_exact_counts():
    model = load_backbone("catalog:bert-base-uncased").model
    applied = Design.from_dict(DOCUMENT).apply(model)
    lora, adapter, bitfit = applied.deltas
    pooler = 768 * 768 + 768
    own = {d.name: d.own_trainable_parameters() for d in applied.deltas}
    assert own == {"lora_qv": 294_912, "adapter_ff": 12 * (768 * 16 + 16 + 16 * 768 + 768),
                   "bitfit_ln": 25 * 768}  # bitfit: 2 per layer + embeddings
    # each delta trains (and would save) the unfrozen pooler with it
    assert [d.num_trainable_parameters() for d in applied.deltas] == [own[d.name] + pooler for d in applied.deltas]
    expected = sum(own.values()) + pooler
    assert applied.num_trainable_parameters() == expected
    assert applied.unfrozen_paths == ["pooler"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pooler.dense.weight" in trainable and "encoder.layer.0.attention.self.query.weight" not in trainable


def test_export_records_resolved_modules_and_counts_and_round_trips():
    model = load_backbone("catalog:bert-base-uncased").model
    exported = Design.from_dict(DOCUMENT).to_dict(model)
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())  # export is dry
    first = exported["deltas"][0]
    assert first["resolved_modules"][0] == "encoder.layer.0.attention.self.query"
    assert len(first["resolved_modules"]) == 24 and first["trainable_parameters"] == 294_912
    assert exported["totals"]["backbone_parameters"] == 109_482_240
    text = json.dumps(exported)
    again = Design.from_dict(json.loads(text))
    assert again.to_dict(model) == exported
    applied = again.apply(model)
    assert applied.num_trainable_parameters() == exported["totals"]["trainable_parameters"]


def test_resolved_modules_that_no_longer_match_are_refused_before_any_change():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    reference = output(model, inputs)
    document = json.loads(json.dumps(DOCUMENT))
    document["deltas"][0]["resolved_modules"] = [
        f"encoder.layer.{i}.attention.self.{n}" for i in range(3) for n in ("query", "value")]
    with pytest.raises(DesignMismatchError, match=r"lora_qv.*no longer matched \['encoder.layer.2"):
        Design.from_dict(document).apply(model)
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    assert torch.equal(output(model, inputs), reference)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="delta-design/9"), "delta-design/1"),
        (lambda d: d["deltas"][1].update(name="lora_qv"), "unique.*lora_qv"),
        (lambda d: d["deltas"][0].update(lora_r=-1), r"deltas\[0\] \(lora_qv\): lora: lora_r must be"),
        (lambda d: d["deltas"].append(5), r"deltas\[3\] must be an object"),
        (lambda d: d.update(unfrozen_modules="pooler"), "unfrozen_modules"),
    ],
)
def test_malformed_designs_are_refused_with_the_reason(change, message):
    document = json.loads(json.dumps(DOCUMENT))
    change(document)
    with pytest.raises(ConfigError, match=message):
        Design.from_dict(document)


def test_a_design_trains_like_its_deltas():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    design = Design.from_dict({"format": "delta-design/1", "deltas": [
        {"delta_type": "lora", "name": "lora"}, {"delta_type": "prefix", "name": "prefix"}]})
    applied = design.apply(model)
    for delta in applied.deltas:
        perturb(delta)
    changed = output(model, inputs)
    applied.detach()
    assert not torch.equal(changed, output(model, inputs))
    assert torch.equal(output(model, inputs), output(tiny_model("llama"), inputs))


def test_exporting_counts_agree_with_building_and_never_touch_the_model():
    model = load_backbone("catalog:bert-base-uncased").model
    design = Design.from_dict(DOCUMENT)
    exported = design.to_dict(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    applied = design.apply(model)
    assert exported["totals"]["trainable_parameters"] == applied.num_trainable_parameters()
    for entry, delta in zip(exported["deltas"], applied.deltas):
        assert entry["resolved_modules"] == delta.modified_paths
        assert entry["trainable_parameters"] == delta.own_trainable_parameters()
