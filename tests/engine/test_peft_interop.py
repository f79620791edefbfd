"""Deltas move to PEFT and back with the same outputs; what either side cannot express is refused."""

import copy
import json

import pytest
import torch
import transformers
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

from engine import CheckpointError, ConfigError, export_peft, import_peft, method_for
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

KINDS = ["bert", "gpt2", "llama"]
EXPORTS = [
    ("lora", {}),
    ("lora", {"use_dora": True}),
    ("lora", {"use_rslora": True, "rank_pattern": {r"[r].*\.0\..*": 2}, "alpha_pattern": {"attn.v": 4}}),
    ("ia3", {}),
    ("soft_prompt", {"soft_token_num": 3}),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, options", EXPORTS)
def test_exported_deltas_load_in_peft_with_the_same_outputs_and_come_back_exactly(kind, name, options, tmp_path):
    model, inputs = tiny_model(kind, dtype=torch.float64), tiny_inputs(kind)
    delta = method_for(name)(model, **options)
    perturb(delta)
    ours = output(model, inputs)
    export_peft(delta, tmp_path, base_model_name_or_path=f"tiny-{kind}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(tiny_model(kind, dtype=torch.float64), tmp_path).eval()
    if name == "soft_prompt":  # PEFT loads the prompt into a float32 table: the file's values, rounded
        prompt = peft_model.prompt_encoder.default.embedding.weight
        exact = next(iter(delta.delta_modules.values())).soft_embeds.detach()
        assert torch.equal(prompt, exact.float())
        peft_model.prompt_encoder.double()
        with torch.no_grad():
            peft_model.prompt_encoder.default.embedding.weight.copy_(exact)
    with torch.no_grad():
        theirs = main_tensor(peft_model(**inputs))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)
    back = import_peft(tmp_path, tiny_model(kind, dtype=torch.float64))
    assert back.delta_type == name
    assert torch.equal(output(back.backbone_model, inputs), ours)


def _peft_trained(kind, config, tmp_path):
    peft_model = get_peft_model(tiny_model(kind, dtype=torch.float64), config)
    if isinstance(config, PromptTuningConfig):
        peft_model.prompt_encoder.double()
    _perturb_trainable(peft_model, 0.05)
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


def _perturb_trainable(model, scale: float, seed: int = 5) -> None:
    """Non-zero, seeded values for every trainable tensor (as training would leave them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@pytest.mark.parametrize("kind, config", [
    ("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])),
    ("gpt2", LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
    ("llama", LoraConfig(r=4, target_modules=r".*\.(q|v)_proj", use_dora=True)),
    ("llama", LoraConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2}, use_rslora=True)),
    ("llama", LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    ("llama", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("gpt2", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)),
])
def test_adapters_made_by_peft_import_with_the_same_outputs(kind, config, tmp_path):
    peft_model = _peft_trained(kind, config, tmp_path)
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        theirs = main_tensor(peft_model(**inputs))
    delta = import_peft(tmp_path, tiny_model(kind, dtype=torch.float64))
    torch.testing.assert_close(output(delta.backbone_model, inputs), theirs, rtol=0, atol=1e-10)


def test_all_linear_with_a_rank_pattern_becomes_readable_expressions(tmp_path):
    _peft_trained("llama", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), tmp_path)
    delta = import_peft(tmp_path, tiny_model("llama"))
    assert delta.config.modified_modules == ["q_proj", "v_proj"]
    assert delta.num_delta_parameters() == 2 * (4 * 64 + 2 * (32 + 16))
    assert delta.num_trainable_parameters() == 0  # loaded for inference, as PEFT's is_trainable=False


def test_what_peft_cannot_express_is_refused_by_name(tmp_path):
    for name in ["adapter", "bitfit", "compacter"]:
        with pytest.raises(ConfigError, match=f"{name} has no PEFT equivalent"):
            export_peft(method_for(name)(tiny_model("llama")), tmp_path / name)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        export_peft(method_for("soft_prompt")(tiny_model("t5"), soft_token_num=2), tmp_path / "t5")


@pytest.mark.parametrize("change, message", [
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "LOHA"}, "'LOHA' have no equivalent"),
    ({"target_modules": ["nothing_like_this"]}, "match no layer"),
    ({"target_modules": ["input_layernorm"]}, "LlamaRMSNorm, which PEFT cannot wrap"),
    ({"kasa_config": {"rank": 2}}, "kasa_config="),
    ({"use_bdlora": True}, "use_bdlora=True"),
    ({"layer_replication": [[0, 1]]}, "layer_replication="),
    ({"init_lora_weights": "pissa"}, "PiSSA"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters .* match no fused experts"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices="),
])
def test_peft_features_this_library_cannot_express_are_refused_by_name(change, message, tmp_path):
    _peft_trained("llama", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not read")  # refused before any tensor is read
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=message):
        import_peft(tmp_path, model)
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())


def test_damaged_peft_directories_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        import_peft(tmp_path, tiny_model("llama"))
    _peft_trained("llama", LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        import_peft(tmp_path, tiny_model("llama"))


def test_rank_pattern_keys_follow_peft_s_rule_not_substrings(tmp_path):
    """PEFT matches a rank_pattern key as ``(.*\\.)?(key)$``: ``1.self_attn.q_proj`` is layer 1's
    q_proj, not layer 11's (a substring test would take both)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=12,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=99)
    base = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, target_modules=["q_proj"], rank_pattern={"1.self_attn.q_proj": 4}, alpha_pattern={"11.self_attn.q_proj": 3}))
    _perturb_trainable(peft_model, 0.3)
    peft_model.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    delta = import_peft(tmp_path, model)
    ranks = {p: delta.delta_modules[p.replace(".", "/")].lora_A.weight.shape[0] for p in delta.modified_paths}
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    assert {r for p, r in ranks.items() if p != "model.layers.1.self_attn.q_proj"} == {2}
    scalings = {p: delta.delta_modules[p.replace(".", "/")].scaling for p in delta.modified_paths}
    assert scalings["model.layers.11.self_attn.q_proj"] == 3 / 2 and scalings["model.layers.1.self_attn.q_proj"] == 8 / 4
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(model(**inputs)), main_tensor(peft_model.eval()(**inputs)),
                                   rtol=0, atol=1e-10)
