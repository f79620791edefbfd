"""Paths that used to give a wrong answer without an error: each is now right or refused by name.

Every test here failed on the engine before the safety contract (issue 10), each for the reason
its name gives.
"""

import json

import pytest
import torch
import transformers
from torch import nn

from engine import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    ConfigError,
    DeltaStateError,
    Design,
    LoraModel,
    ModuleNotSupportedError,
    ParallelAdapterModel,
    estimate_delta,
    export_peft,
    import_peft,
    load_backbone,
)
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import tiny_inputs, tiny_model

# --- 1. dropout follows the backbone's mode; loading is for inference unless asked --------------


def _repeatable(model, inputs) -> bool:
    return torch.equal(output(model, inputs), output(model, inputs))


def test_a_delta_attached_to_an_eval_model_has_its_dropout_off():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")  # tiny_model is in eval()
    delta = LoraModel(model, lora_dropout=0.5)
    perturb(delta)
    assert not any(m.training for m in delta.modules())
    assert _repeatable(model, inputs)
    model.train()  # the mode still follows the model afterwards
    assert all(m.training for layer in delta.delta_modules.values() for m in layer.modules())
    assert not _repeatable(model, inputs)


@pytest.mark.parametrize("loader", ["from_finetuned", "import_peft"])
def test_loading_for_inference_leaves_the_model_in_eval_with_nothing_trainable(loader, tmp_path):
    trained, inputs = tiny_model("bert"), tiny_inputs("bert")
    delta = LoraModel(trained, lora_dropout=0.5).freeze_module()
    perturb(delta)
    expected = output(trained, inputs)
    (delta.save_finetuned if loader == "from_finetuned" else lambda d: export_peft(delta, d))(tmp_path)
    fresh = tiny_model("bert").train()  # a model still in training mode
    load = AutoDeltaModel.from_finetuned if loader == "from_finetuned" else import_peft
    loaded = load(tmp_path, backbone_model=fresh)
    assert not fresh.training and not any(m.training for m in fresh.modules())
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(output(fresh, inputs), expected)
    assert _repeatable(fresh, inputs)
    again = tiny_model("bert").train()
    trainable = load(tmp_path, backbone_model=again, is_trainable=True)
    assert again.training  # its mode is kept: training goes on
    assert {id(p) for p in again.parameters() if p.requires_grad} == {id(p) for p in trainable.parameters()}
    assert loaded.num_trainable_parameters() == 0 and trainable.num_trainable_parameters() > 0


# --- 2. every trained tensor is saved -------------------------------------------------------------


def test_the_readme_quickstart_is_bit_exact_after_reload_with_a_trained_pooler(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8)
    delta.freeze_module(exclude=["deltas", "pooler"], set_state_dict=True)
    pooler = model.pooler.dense.weight.numel() + model.pooler.dense.bias.numel()
    assert delta.num_trainable_parameters() == 2 * 2 * 8 * (32 + 32) + pooler
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).pooler_output.pow(2).mean().backward()
    optimizer.step()
    expected = model(**inputs).pooler_output.detach()
    delta.save_finetuned(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["unfrozen_modules"] == ["deltas", "pooler"] and config["unfrozen_paths"] == ["pooler"]
    fresh = tiny_model("bert")
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(fresh(**inputs).pooler_output, expected)


def test_trained_buffers_of_unfrozen_modules_travel_too(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    delta = LoraModel(net, ["0"], lora_r=2).freeze_module(exclude=["deltas", "1"])
    perturb(delta)
    net.train()
    net(torch.randn(8, 4))  # moves the running statistics
    net.eval()
    probe = torch.randn(3, 4)
    expected = net(probe)
    delta.save_finetuned(tmp_path)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(fresh(probe), expected)


def test_a_trainable_tensor_the_checkpoint_would_leave_out_is_an_error(tmp_path):
    model = tiny_model("bert")
    delta = LoraModel(model).freeze_module()
    model.pooler.dense.weight.requires_grad_(True)  # trained, but not declared as unfrozen
    with pytest.raises(DeltaStateError, match=r"1 backbone tensors require grad but would not be in this "
                                              r"checkpoint \(pooler.dense.weight\).*freeze_module\(exclude="):
        delta.save_finetuned(tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


# --- 3. merging into a shared weight --------------------------------------------------------------


def test_merging_into_a_tied_weight_is_refused_and_untie_merges_exactly():
    model = tiny_model("gpt2", dtype=torch.float64)  # lm_head.weight is transformer.wte.weight
    inputs = tiny_inputs("gpt2")
    embedding = model.transformer.wte.weight.detach().clone()
    delta = LoraModel(model, ["lm_head"], lora_r=4)
    perturb(delta)
    unmerged = output(model, inputs)
    with pytest.raises(DeltaStateError, match=r"cannot merge into lm_head.weight: that tensor is shared with "
                                              r"transformer.wte.weight \(tied weights\).*merge\(untie=True\)"):
        delta.merge()
    assert not delta.is_merged and torch.equal(model.transformer.wte.weight, embedding)
    delta.merge(untie=True)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, embedding)  # the input embedding is untouched
    torch.testing.assert_close(output(model, inputs), unmerged, rtol=0, atol=1e-10)


# --- 4. a target the model never calls --------------------------------------------------------------


def tiny_mamba() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=99)
    return transformers.MambaModel(config).eval()


def test_a_module_whose_weight_the_model_reads_directly_is_refused_by_name():
    model = tiny_mamba()
    with pytest.raises(ModuleNotSupportedError, match=r"cannot modify 'layers.0.mixer.dt_proj': the model never "
                                                      r"calls 'layers.0.mixer.dt_proj'; it reads its parameters "
                                                      r"directly.*layers.1.mixer.dt_proj"):
        LoraModel(model, ["dt_proj"])
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    assert LoraModel(model, ["x_proj"]).modified_paths == ["layers.0.mixer.x_proj", "layers.1.mixer.x_proj"]
    with pytest.raises(ModuleNotSupportedError, match="dt_proj"):
        estimate_delta(model, AutoDeltaConfig.from_dict({"delta_type": "bitfit", "modified_modules": ["dt_proj"]}))


def test_modules_the_pseudo_input_does_not_reach_are_not_mistaken_for_bypassed_ones():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, vocab_size=99, is_decoder=True, add_cross_attention=True)
    model = transformers.BertModel(config).eval()  # cross-attention runs only with encoder states
    delta = LoraModel(model, ["crossattention.self.query"], lora_r=2)
    assert len(delta.modified_paths) == 2


# --- 7. small updates survive a 16-bit backbone ---------------------------------------------------


def test_deltas_on_a_bfloat16_backbone_are_float32_and_take_small_updates():
    assert torch.tensor(0.1, dtype=torch.bfloat16) + 1e-4 == torch.tensor(0.1, dtype=torch.bfloat16)
    model, inputs = tiny_model("llama").to(torch.bfloat16), tiny_inputs("llama")
    delta = LoraModel(model, lora_r=4)
    assert {p.dtype for p in delta.parameters()} == {torch.float32}
    perturb(delta)
    logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    before = {n: p.detach().clone() for n, p in delta.named_parameters()}
    torch.optim.SGD(delta.parameters(), lr=1e-4).step()
    assert all(not torch.equal(p, before[n]) for n, p in delta.named_parameters())
    kept = LoraModel(tiny_model("llama").to(torch.bfloat16), lora_r=4, delta_dtype="backbone")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_the_bfloat16_update_is_the_float32_update_rounded_once():
    model = tiny_model("llama").to(torch.bfloat16)
    delta = LoraModel(model, ["q_proj"], lora_r=4)
    perturb(delta)
    query = model.model.layers[0].self_attn.q_proj
    hidden = torch.randn(2, 3, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    layer = delta.delta_modules["model/layers/0/self_attn/q_proj"]
    with torch.no_grad():
        update = (hidden.float() @ layer.lora_A.weight.T * layer.scaling) @ layer.lora_B.weight.T
        expected = nn.functional.linear(hidden, query.weight) + update.to(torch.bfloat16)
        assert torch.equal(query(hidden), expected)


def test_checkpoint_sizes_follow_the_real_dtype():
    model = load_backbone("catalog:llama-3-8b").model.to(torch.bfloat16)  # on the meta device
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 8})
    estimate = estimate_delta(model, config)
    assert estimate.checkpoint_bytes == 4 * estimate.total
    kept = estimate_delta(model, AutoDeltaConfig.from_dict({"delta_type": "lora", "delta_dtype": "backbone"}))
    assert kept.checkpoint_bytes == 2 * kept.total


# --- 8. LoRA on convolutions ----------------------------------------------------------------------


def test_grouped_convolutions_are_refused_with_the_reason():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1))
    with pytest.raises(ModuleNotSupportedError, match=r"grouped convolution \(groups=8\).*could never be merged"):
        LoraModel(net, ["0"], lora_r=2)


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate", "zeros"])
def test_lora_on_a_padded_convolution_is_the_lora_of_that_convolution(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode=mode)).double()
    image = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    delta = LoraModel(net, ["0"], lora_r=2)
    perturb(delta)
    unmerged = net(image)
    layer = delta.delta_modules["0"]
    by_hand = nn.Conv2d(3, 5, 3, padding=1, padding_mode=mode).double()
    with torch.no_grad():
        by_hand.weight.copy_(net[0].weight + layer.update())
        by_hand.bias.copy_(net[0].bias)
    torch.testing.assert_close(unmerged, by_hand(image), rtol=0, atol=1e-12)
    delta.merge()
    torch.testing.assert_close(net(image), unmerged, rtol=0, atol=1e-12)


# --- 9. common names and defaults never select the output head ----------------------------------


@pytest.mark.parametrize("kind", ["t5", "gpt2", "llama"])
def test_common_names_and_defaults_leave_the_output_head_alone(kind):
    model = tiny_model(kind)
    built = [BitFitModel(model, ["ff"], name="bitfit_ff", attach=False),
             BitFitModel(model, name="bitfit_defaults", attach=False),
             ParallelAdapterModel(model, attach=False), CompacterModel(model, attach=False, hypercomplex_division=2)]
    for delta in built:
        assert not any(p == "lm_head" or p.endswith(".lm_head") for p in delta.modified_paths), delta.name
    typed = BitFitModel(model, ["lm_head"], name="bitfit_head", attach=False)  # a real name still can
    assert typed.modified_paths == ["lm_head"]


# --- 11. an empty design ---------------------------------------------------------------------------


def test_a_design_with_no_delta_and_nothing_unfrozen_is_refused():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="no delta and unfreezes no module.*train nothing"):
        Design.from_dict({"format": "delta-design/1", "deltas": []}).build(model)
    assert all(p.requires_grad for p in model.parameters())
    only_pooler = Design.from_dict({"format": "delta-design/1", "deltas": [], "unfrozen_modules": ["pooler"]})
    applied = only_pooler.build(model)
    assert applied.num_trainable_parameters() == 32 * 32 + 32


def test_a_failed_design_build_leaves_no_delta_behind():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    perturb(AdapterModel(model, name="adapter_b"))  # already there: the design's second delta collides
    reference = output(model, inputs)
    document = {"format": "delta-design/1",
                "deltas": [{"delta_type": "lora", "name": "lora_a"}, {"delta_type": "adapter", "name": "adapter_b"}]}
    with pytest.raises(DeltaStateError, match="already has a submodule named 'adapter_b'"):
        Design.from_dict(document).build(model)
    assert not any(name.endswith(".lora_a") for name, _ in model.named_modules())
    assert torch.equal(output(model, inputs), reference)


@pytest.mark.parametrize("settings", [
    {"delta_type": "compacter", "shared_phm_rule": True},  # rules shared by every module, saved once
    {"delta_type": "prefix", "reparameterize": True},  # one MLP for every layer
    {"delta_type": "lora", "lora_r": 4},
    {"delta_type": "adapter"},
])
def test_the_estimated_checkpoint_size_is_what_saving_writes(settings, tmp_path):
    """The designer's checkpoint size, against the bytes of the tensors in the real file."""
    from safetensors import safe_open

    model = tiny_model("llama")
    estimate = estimate_delta(model, AutoDeltaConfig.from_dict(settings))
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(settings), model).freeze_module()
    delta.save_finetuned(tmp_path)
    with safe_open(str(tmp_path / "delta.safetensors"), "pt") as saved:
        written = sum(saved.get_tensor(key).numel() * saved.get_tensor(key).element_size() for key in saved.keys())
    assert estimate.checkpoint_bytes == written and written > 0
