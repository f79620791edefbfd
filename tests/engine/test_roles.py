"""Structural role inference: agrees with the hand-written table where both exist, and gives
working defaults on architectures the table has never heard of."""

import pytest

from engine import AutoDeltaModel, ConfigError, ModuleTree, load_backbone, resolve
from engine.roles import infer_roles
from engine.structure import COMMON_NAME_MAP, expand_common_names

TABLE_SOURCES = ["arch:bert", "arch:roberta", "arch:gpt2", "arch:opt", "arch:llama", "arch:mistral",
                 "arch:qwen2", "arch:bart", "arch:t5", "arch:deberta-v2"]
ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2", "embeddings"]


@pytest.mark.parametrize("source", TABLE_SOURCES)
def test_inference_agrees_with_the_hand_written_table(source):
    model = load_backbone(source).model
    tree = ModuleTree.from_model(model)
    roles = infer_roles(model, tree)
    table = COMMON_NAME_MAP[model.config.model_type]
    for role in ROLES:
        if role not in table:
            continue
        by_table = resolve(tree, table[role]).paths
        assert roles.by_role.get(role) == by_table, (source, role)


@pytest.mark.parametrize("source", ["arch:falcon", "arch:phi", "arch:mpt", "arch:gemma", "arch:gpt_neox",
                                    "arch:bloom", "arch:electra", "arch:whisper", "arch:clip", "arch:stablelm",
                                    "arch:vit"])
def test_defaults_work_on_architectures_without_a_table_entry(source):
    model = load_backbone(source).model
    assert model.config.model_type not in COMMON_NAME_MAP
    for method in ("lora", "adapter", "bitfit"):
        delta = AutoDeltaModel.from_config({"delta_type": method}, model, attach=False)
        assert delta.num_trainable_parameters() > 0 and delta.modified_paths, (source, method)


def test_roles_and_labels_on_known_shapes():
    gpt2 = infer_roles(load_backbone("catalog:gpt2").model)
    assert gpt2.by_role["attn.qkv"][0] == "transformer.h.0.attn.c_attn"
    assert "fused q, k, v projection" in gpt2.label("transformer.h.0.attn.c_attn")
    llama = infer_roles(load_backbone("catalog:llama-3-8b").model)
    assert llama.by_role["ff.gate"][0] == "model.layers.0.mlp.gate_proj"
    assert llama.by_role["ff.w1"][0] == "model.layers.0.mlp.up_proj"
    assert len(llama.by_role["layers"]) == 32
    t5 = infer_roles(load_backbone("catalog:t5-base").model)
    assert len(t5.by_role["layers"]) == 24 and len(t5.by_role["cross_attn"]) == 12
    mixtral = infer_roles(load_backbone("catalog:mixtral-8x7b").model)
    assert mixtral.by_role["moe.experts"][0] == "model.layers.0.mlp.experts"


def test_a_role_that_is_not_found_says_which_and_what_to_do():
    model = load_backbone("catalog:mixtral-8x7b").model
    with pytest.raises(ConfigError, match=r"common name 'ff.w2': no module .*recognised.*roles found: .*attn.q"):
        expand_common_names(model, ["ff.w2"])
