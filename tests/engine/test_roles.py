"""Structural role inference: agrees with the hand-written table where both exist, and gives
working defaults on architectures the table has never heard of."""

import pytest

from engine import (
    AutoDeltaModel,
    ConfigError,
    ModuleTree,
    build_on_meta,
    load_backbone,
    resolve,
)
from engine.roles import COMMON_NAME_MAP, expand_common_names, infer_roles

_BERT_LIKE = {
    "attn": [r"[r]\d+\.attention"],  # the block; prefix descends to the module that attends
    "attn.q": ["attention.self.query"],
    "attn.k": ["attention.self.key"],
    "attn.v": ["attention.self.value"],
    "attn.o": ["attention.output.dense"],
    "ff": ["intermediate.dense", r"[r]\d+\.output\.dense"],
    "ff.w1": ["intermediate.dense"],
    "ff.w2": [r"[r]\d+\.output\.dense"],
    "layer_norm": ["LayerNorm"],
    "embeddings": ["word_embeddings"],
}
_LLAMA_LIKE = {
    "attn": ["self_attn"],
    "attn.q": ["q_proj"],
    "attn.k": ["k_proj"],
    "attn.v": ["v_proj"],
    "attn.o": ["o_proj"],
    "ff": ["mlp"],
    "ff.w1": ["up_proj"],
    "ff.gate": ["gate_proj"],
    "ff.w2": ["down_proj"],
    "layer_norm": [r"[r]\w*norm"],
    "embeddings": ["embed_tokens"],
}
# bart's one input embedding is ``shared``, tied to the encoder's and decoder's embed_tokens
_BART_LIKE = {
    "attn": [r"[r](self_attn|encoder_attn)"],
    "attn.q": ["q_proj"],
    "attn.k": ["k_proj"],
    "attn.v": ["v_proj"],
    "attn.o": ["out_proj"],
    "ff": ["fc1", "fc2"],
    "ff.w1": ["fc1"],
    "ff.w2": ["fc2"],
    "layer_norm": [r"[r]\w*(layer_norm|layernorm)\w*"],  # layernorm_embedding included
}

#: model_type → common name → the expressions a person would write (this library's first,
#: hand-written table, kept as the expectation for what inference finds).
BY_HAND: dict[str, dict[str, list[str]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "deberta-v2": {
        **_BERT_LIKE,
        "attn.q": ["query_proj"],
        "attn.k": ["key_proj"],
        "attn.v": ["value_proj"],
    },
    "gpt2": {
        "attn": ["[r]attn"],
        # GPT-2 fuses q, k and v into one projection: each of them means c_attn
        "attn.q": ["c_attn"],
        "attn.k": ["c_attn"],
        "attn.v": ["c_attn"],
        "attn.o": ["attn.c_proj"],
        "ff": ["mlp"],
        "ff.w1": ["c_fc"],
        "ff.w2": ["mlp.c_proj"],
        "layer_norm": [r"[r]ln_\w+"],
        "embeddings": ["wte"],
    },
    "opt": {**_BART_LIKE, "attn": ["self_attn"], "embeddings": ["embed_tokens"]},
    "bart": _BART_LIKE,
    "t5": {
        "attn": [r"[r](SelfAttention|EncDecAttention)"],
        "attn.q": ["q"],
        "attn.k": ["k"],
        "attn.v": ["v"],
        "attn.o": ["o"],
        "ff": ["DenseReluDense"],
        "ff.w1": [r"[r]wi(_0|_1)?"],
        "ff.w2": ["wo"],
        "layer_norm": [r"[r]\w*layer_norm"],
        "embeddings": ["shared"],
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}




@pytest.mark.parametrize("model_type", sorted(BY_HAND))
def test_inference_finds_what_a_person_would_write(model_type):
    model = load_backbone(f"arch:{model_type}").model
    tree = ModuleTree.from_model(model)
    roles = infer_roles(model, tree)
    for role, expressions in BY_HAND[model_type].items():
        assert roles.by_role.get(role) == resolve(tree, expressions).paths, (model_type, role)


@pytest.mark.parametrize("source", ["arch:falcon", "arch:phi", "arch:mpt", "arch:gemma", "arch:gpt_neox",
                                    "arch:bloom", "arch:electra", "arch:whisper", "arch:clip", "arch:stablelm",
                                    "arch:vit"])
def test_defaults_work_on_architectures_without_a_table_entry(source):
    model = load_backbone(source).model
    assert not COMMON_NAME_MAP  # inference covers every architecture
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


def test_ia3_scales_the_inputs_of_inferred_feed_forward_down_projections():
    model = load_backbone("arch:phi").model  # phi: fc1/fc2, found by shape
    delta = AutoDeltaModel.from_config({"delta_type": "ia3"}, model, attach=False)
    assert delta.modified_paths[:3] == ["layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj", "layers.0.mlp.fc2"]
    assert delta.delta_modules["layers/0/mlp/fc2"].on_input
    # 24 layers × (k output 2048 + v output 2048 + fc2 input 8192)
    assert delta.num_trainable_parameters() == 24 * (2048 + 2048 + 8192)


@pytest.mark.parametrize(("source", "vision", "text"), [
    ("arch:clip", "vision_model", "text_model"), ("arch:llava", "vision_tower", "language_model"),
    ("arch:qwen2_vl", "visual", "language_model")])
def test_multimodal_towers_are_found(source, vision, text):
    roles = infer_roles(load_backbone(source).model)
    assert roles.by_role["tower.vision"] == [vision] and roles.by_role["tower.text"] == [text]
    assert roles.label(vision) == "vision tower"
    assert "tower.vision" not in infer_roles(load_backbone("arch:bert").model).by_role


def _meta(model_type: str, **sizes):
    from transformers import AutoConfig

    return build_on_meta(AutoConfig.for_model(model_type, **sizes))


def test_deepseek_v3_shared_experts_narrower_than_the_residual_are_read_by_dataflow():
    # the shared experts' width (2 × 24 = 48) is below the hidden size (64): a width rule inverts them
    model = _meta("deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                  n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=3,
                  first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=99)
    roles = infer_roles(model).by_role
    layer = "layers.1.mlp.shared_experts"
    assert f"{layer}.gate_proj" in roles["ff.gate"] and f"{layer}.up_proj" in roles["ff.w1"]
    assert f"{layer}.down_proj" in roles["ff.w2"]
    assert not any("shared_experts.gate_proj" in p or "shared_experts.up_proj" in p for p in roles["ff.w2"])
    assert "layers.0.mlp.down_proj" in roles["ff.w2"]  # the dense first layer
    assert roles["moe.experts"] == ["layers.1.mlp.experts", "layers.2.mlp.experts"]
    assert not any(p.endswith("mlp.gate") for r in ("ff.w1", "ff.w2", "ff.gate") for p in roles[r])  # the router


def test_qwen3_moe_router_and_experts():
    model = _meta("qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_experts=8,
                  num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, vocab_size=99)
    roles = infer_roles(model).by_role
    assert roles["moe.experts"] == ["layers.0.mlp.experts", "layers.1.mlp.experts"]
    assert roles["moe"] == ["layers.0.mlp", "layers.1.mlp"]
    assert "ff.w2" not in roles and "ff.w1" not in roles  # the router is no projection
    assert roles["attn.q"] == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("intermediate", [16, 32, 128])
def test_a_feed_forward_narrower_than_the_residual_keeps_its_roles(intermediate):
    model = _meta("llama", hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
    roles = infer_roles(model).by_role
    for role, name in (("ff.gate", "gate_proj"), ("ff.w1", "up_proj"), ("ff.w2", "down_proj")):
        assert roles[role] == [f"layers.{i}.mlp.{name}" for i in range(2)], (intermediate, role)
