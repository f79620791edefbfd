"""A fixed sample of 50+ architectures across families, on the meta device (seconds): the roles
inferred and the exact counts of AutoDelta's lora/adapter/bitfit defaults, checked against the
record in arch_sample.json and against each method's formula applied to the wrapped weights."""

import json

import pytest

from tests.engine.arch_sample import METHODS, RECORD, SAMPLE, survey

RECORDED = json.loads(RECORD.read_text())
CASES = [(family, model_type) for family, types in SAMPLE.items() for model_type in types]
#: roles every model of a family must show (convolutional vision models are attention-free)
REQUIRED = {
    "encoder": {"attn", "attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2", "layer_norm", "embeddings"},
    "decoder": {"attn", "attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2", "embeddings"},
    "encoder-decoder": {"attn", "attn.q", "attn.v", "attn.o", "ff.w1", "ff.w2", "layer_norm", "embeddings"},
    "vision": {"ff.w1", "ff.w2", "layer_norm"},
    "speech": {"attn", "attn.q", "attn.v", "attn.o", "ff.w1", "ff.w2", "layer_norm"},
    "multimodal": {"attn", "attn.q", "attn.v", "attn.o", "ff.w1", "ff.w2", "layer_norm"},
    "moe": {"attn", "attn.v", "moe", "moe.experts", "embeddings"},  # JetMoE's queries are experts too
    "attention-free": {"ff.w1", "ff.w2", "embeddings", "layers"},
}


def test_the_sample_spans_every_family():
    assert len(CASES) >= 40
    assert all(len(types) >= 4 for types in SAMPLE.values())
    assert {f: sorted(t) for f, t in RECORDED.items()} == {f: sorted(t) for f, t in SAMPLE.items()}


@pytest.mark.parametrize(("family", "model_type"), CASES, ids=[t for _, t in CASES])
def test_roles_and_default_counts(family, model_type):
    found = survey(model_type)
    assert REQUIRED[family] <= set(found["roles"]), sorted(REQUIRED[family] - set(found["roles"]))
    for method in METHODS:
        assert found[method]["trainable"] == found[method]["by_shapes"] > 0, method
    if not {"attn.q", "attn.k", "attn.v"} & set(found["roles"]):  # LoRA falls back to the dense projections
        assert found["lora"]["modules"] == found["roles"]["ff.w1"] + found["roles"]["ff.w2"]
    assert found == RECORDED[family][model_type]
