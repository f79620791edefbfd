"""LoRA on transformers 5 fused MoE experts, delta methods on convolutions, and the default
positions' fallbacks on models that lack a default role."""

import logging

import pytest
import torch
import transformers

from engine import AutoDeltaModel, ConfigError, LoraModel, load_backbone
from engine import AutoDeltaModel as _Auto
from engine.errors import ModuleNotSupportedError
from engine.interop.peft import export_peft
from engine.roles import default_positions
from tests.engine.test_delta_matrix import output, perturb

IDS = {"input_ids": torch.tensor([[5, 17, 3, 42, 8, 1, 64]])}


def tiny_mixtral(implementation: str = "eager", dtype: torch.dtype = torch.float32) -> transformers.MixtralModel:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=99)
    model = transformers.MixtralModel(config).eval().to(dtype)
    model.set_experts_implementation(implementation)
    return model


def manual_expert_update(model, delta) -> transformers.MixtralModel:
    """The same model with W[e] + B[e]·A[e]·scaling written into the weights by hand."""
    reference = tiny_mixtral(dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for path in delta.modified_paths:
            layer = delta.delta_modules[path.replace(".", "/")]
            experts = reference.get_submodule(path)
            for name in ("gate_up_proj", "down_proj"):
                a, b = layer.lora_A[name], layer.lora_B[name]
                for expert in range(a.shape[0]):
                    getattr(experts, name)[expert] += b[expert] @ a[expert] * layer.scaling
    return reference


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_lora_on_fused_experts_matches_weights_edited_by_hand(implementation):
    # float64 tells rounding from a bug; grouped_mm runs float32 only (same update code, 1e-5)
    precise = implementation != "grouped_mm"
    model = tiny_mixtral(implementation, torch.float64 if precise else torch.float32)
    before = output(model, IDS)
    delta = LoraModel(model, ["moe.experts"], lora_r=3, lora_alpha=6)
    assert delta.modified_paths == ["layers.0.mlp.experts", "layers.1.mlp.experts"]
    # per expert and per fused parameter: r·(rows + columns)
    assert delta.num_trainable_parameters() == 2 * 4 * 3 * ((48 + 32) + (32 + 24))
    assert torch.equal(output(model, IDS), before)
    perturb(delta)
    changed = output(model, IDS)
    assert (changed - before).abs().max() > 1e-3
    torch.testing.assert_close(changed, output(manual_expert_update(model, delta), IDS), rtol=0,
                               atol=1e-10 if precise else 1e-5)
    delta.detach()
    assert torch.equal(output(model, IDS), before)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_expert_factors_train_save_load_and_merge(tmp_path):
    model = tiny_mixtral(dtype=torch.float64)
    delta = LoraModel(model, ["moe.experts"], lora_r=2)
    delta.freeze_module()
    perturb(delta)
    model(**IDS).last_hidden_state.pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    expected = output(model, IDS)
    delta.save_finetuned(tmp_path / "experts")
    fresh = tiny_mixtral(dtype=torch.float64)
    _Auto.from_finetuned(tmp_path / "experts", fresh)
    assert torch.equal(output(fresh, IDS), expected)
    delta.merge()
    torch.testing.assert_close(output(model, IDS), expected, rtol=0, atol=1e-10)
    delta.unmerge()


def test_expert_weights_are_restored_when_the_forward_raises():
    model = tiny_mixtral()
    LoraModel(model, ["moe.experts"])
    experts = model.layers[0].mlp.experts
    original = experts.down_proj
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the experts' forward
        experts(torch.zeros(3, 32), torch.zeros(3, 2, dtype=torch.long), None)
    assert experts.down_proj is original and isinstance(experts.down_proj, torch.nn.Parameter)


def test_expert_lora_refuses_what_it_cannot_honour(tmp_path):
    with pytest.raises(ModuleNotSupportedError, match="lora_dropout drops a layer's input.*fused experts"):
        LoraModel(tiny_mixtral(), ["moe.experts"], lora_dropout=0.1)
    delta = LoraModel(tiny_mixtral(), ["moe.experts"], rank_pattern={"[r]layers\\.0\\.mlp\\.experts": 4})
    with pytest.raises(ConfigError, match="per-module ranks or alphas on fused experts"):
        export_peft(delta, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_expert_lora_moves_to_peft_target_parameters_and_back(tmp_path):
    """PEFT ≥ 0.17 loads LoRA on fused experts as target_parameters: same outputs both ways."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model

    from engine import import_peft

    inputs = {"input_ids": torch.tensor([[3, 14, 15, 92, 65, 35], [8, 9, 79, 32, 38, 46]])}
    model = tiny_mixtral(dtype=torch.float64)
    delta = LoraModel(model, ["attn.q", "moe.experts"], lora_r=2, lora_alpha=3)
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.normal_()
        ours = model(**inputs).last_hidden_state
    export_peft(delta, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"layers.{i}.mlp.experts.{n}" for i in range(2)
                                           for n in ("gate_up_proj", "down_proj")]
    assert config["target_modules"] == ["q_proj"]
    theirs = PeftModel.from_pretrained(tiny_mixtral(dtype=torch.float64), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).last_hidden_state, ours, rtol=0, atol=1e-10)
    back = import_peft(tmp_path / "ours", tiny_mixtral(dtype=torch.float64))
    with torch.no_grad():
        assert torch.equal(back.backbone_model(**inputs).last_hidden_state, ours)
    trained = get_peft_model(tiny_mixtral(dtype=torch.float64), LoraConfig(
        r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.normal_()
        expected = trained.eval()(**inputs).last_hidden_state
    trained.save_pretrained(tmp_path / "peft")
    imported = import_peft(tmp_path / "peft", tiny_mixtral(dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(imported.backbone_model(**inputs).last_hidden_state, expected,
                                   rtol=0, atol=1e-10)


def test_expert_counts_on_a_meta_mixtral_8x7b():
    model = load_backbone("catalog:mixtral-8x7b").model
    delta = LoraModel(model, ["moe.experts"], lora_r=8)
    hidden, inner = 4096, 14336
    assert delta.num_trainable_parameters() == 32 * 8 * 8 * ((2 * inner + hidden) + (hidden + inner))


def test_convolutions_take_lora_adapters_and_biases_along_their_channels():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(6, 12, 1), torch.nn.GELU(), torch.nn.Conv1d(12, 6, 1))
    signal = torch.randn(2, 6, 9)
    before = net(signal)
    for method, options in (("lora", {"lora_r": 2}), ("adapter", {"bottleneck_dim": 3}), ("bitfit", {})):
        delta = AutoDeltaModel.from_config({"delta_type": method, "modified_modules": ["0", "2"], **options}, net)
        assert torch.equal(net(signal), before), method
        perturb(delta)
        changed = net(signal)
        assert changed.shape == before.shape and (changed - before).abs().max() > 1e-4, method
        delta.detach()
        assert torch.equal(net(signal), before), method
    bias = AutoDeltaModel.from_config({"delta_type": "bitfit", "modified_modules": ["2"]}, net)
    with torch.no_grad():
        bias.delta_modules["2"].bias.copy_(torch.arange(6.0))
    torch.testing.assert_close(net(signal), before + torch.arange(6.0).view(1, 6, 1))


def test_defaults_fall_back_where_a_model_lacks_a_role(caplog):
    mixtral = load_backbone("catalog:mixtral-8x7b").model
    with caplog.at_level(logging.INFO, logger="engine.roles.common_names"):
        assert default_positions(mixtral, ["attn.o", "ff.w2"]) == ["attn.o", "moe"]
    assert "has no 'ff.w2' role; default position 'moe' used instead" in caplog.text
    adapter = AutoDeltaModel.from_config({"delta_type": "adapter"}, mixtral, attach=False)
    assert adapter.modified_paths[:2] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp"]
    mamba = load_backbone("arch:mamba").model
    assert default_positions(mamba, ["attn.q", "attn.v"]) == ["ff.w1", "ff.w2"]
    lora = AutoDeltaModel.from_config({"delta_type": "lora"}, mamba, attach=False)
    # the mixer's own projections (x_proj, dt_proj) neither read nor write the residual stream
    assert lora.modified_paths[:3] == ["layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.1.mixer.in_proj"]
    assert len(lora.modified_paths) == 2 * 32
    # a name the user writes is never replaced
    with pytest.raises(ConfigError, match="common name 'attn.q': no module of model type 'mamba'"):
        LoraModel(mamba, ["attn.q"])
