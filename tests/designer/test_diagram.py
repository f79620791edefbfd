"""The block diagram's schematic of one folded layer, from the engine's roles: sections in the
order a layer runs them, projections and norms as collapsed nodes, pre- or post-norm."""

from designer.diagram import layer_schematic
from designer.state import load


def _outline(source: str) -> list[tuple]:
    schematic = layer_schematic(load(source))
    return [(s["name"], s["node"], s["norm"], s["norm_position"], [(b["role"], b["output"]) for b in s["blocks"]])
            for s in schematic["sections"]]


def test_a_pre_norm_decoder_with_a_gated_ffn():
    schematic = layer_schematic(load("catalog:llama-3.1-405b"))
    assert schematic["layer"] == "model.layers.*" and schematic["layers"] == 126
    assert _outline("catalog:llama-3.1-405b") == [
        ("attention", "model.layers.*.self_attn", "model.layers.*.input_layernorm", "before",
         [("attn.q", False), ("attn.k", False), ("attn.v", False), ("attn.o", True)]),
        ("feed-forward", "model.layers.*.mlp", "model.layers.*.post_attention_layernorm", "before",
         [("ff.gate", False), ("ff.w1", False), ("ff.w2", True)])]


def test_a_post_norm_encoder_whose_ffn_has_no_module_of_its_own():
    assert _outline("minilm") == [
        ("attention", "encoder.layer.*.attention", "encoder.layer.*.attention.output.LayerNorm", "after",
         [("attn.q", False), ("attn.k", False), ("attn.v", False), ("attn.o", True)]),
        ("feed-forward", None, "encoder.layer.*.output.LayerNorm", "after", [("ff.w1", False), ("ff.w2", True)])]


def test_a_fused_projection_and_a_second_stack_noted():
    assert _outline("catalog:gpt2")[0][4] == [("attn.qkv", False), ("attn.o", True)]
    t5 = layer_schematic(load("catalog:t5-base"))
    assert t5["stack"] == "encoder.block" and t5["other_stacks"] == ["decoder.block"]


def test_a_model_without_layer_roles_has_no_schematic():
    assert layer_schematic(load("python:tests.designer.slow_models:tiny", allow_python=True)) is None
