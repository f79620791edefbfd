"""Each method is the one its paper (and OpenDelta/PEFT) defines: Compacter's rules shared across
layers, prefix tuning's one reparameterisation MLP, LoRA on embeddings initialised like loralib."""

import pytest
import torch
from safetensors import safe_open

from engine import AutoDeltaModel, CompacterModel, LoraModel, PrefixModel, load_backbone
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

# --- Compacter -------------------------------------------------------------------------------------


def _phm_layers(delta):
    return [m for layer in delta.delta_modules.values() for m in (layer.down, layer.up)]


def test_compacter_shares_one_set_of_rules_across_all_layers(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    delta = CompacterModel(model, ["attn.o"], hypercomplex_division=4, reduction_factor=4).freeze_module()
    rules = delta.shared_modules["phm_rule"].rule
    assert rules.shape == (4, 4, 4)
    assert all(layer.rule().rule is rules for layer in _phm_layers(delta))
    assert sum(1 for p in delta.parameters() if p is rules) == 1
    # the shared rules learn from every layer: their gradient is the sum over all of them
    perturb(delta)
    main_tensor(model(**inputs)).pow(2).mean().backward()
    total = rules.grad.clone()
    assert total.abs().sum() > 0
    delta.save_finetuned(tmp_path)
    with safe_open(str(tmp_path / "delta.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert [k for k in keys if "rule" in k] == ["shared::phm_rule.rule"]
    expected = output(model, inputs)
    fresh = tiny_model("bert")
    loaded = AutoDeltaModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(output(fresh, inputs), expected)
    assert all(layer.rule().rule is loaded.shared_modules["phm_rule"].rule for layer in _phm_layers(loaded))


def test_compacter_weight_is_the_sum_of_kronecker_products():
    model = tiny_model("bert")
    delta = CompacterModel(model, ["attn.o"], hypercomplex_division=4, reduction_factor=4, phm_rank=2)
    perturb(delta)
    layer = delta.delta_modules["encoder/layer/0/attention/output/dense"].down
    rules, blocks = layer.rule().matrices(), layer.left @ layer.right
    by_hand = sum(torch.kron(rules[i], blocks[i]) for i in range(4))
    torch.testing.assert_close(layer.weight(), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("options, parameters", [
    ({}, {"left", "right", "bias"}),
    ({"factorized_phm": False}, {"blocks", "bias"}),
    ({"use_bias_down_sampler": False, "use_bias_up_sampler": False}, {"left", "right"}),
])
def test_compacter_options_shape_the_layers_as_opendelta_names_them(options, parameters):
    delta = CompacterModel(tiny_model("bert"), ["attn.o"], hypercomplex_division=4, reduction_factor=4, **options)
    for layer in _phm_layers(delta):
        assert set(layer._parameters) - {"phm_rule"} == parameters


def test_compacter_rule_options():
    model = tiny_model("bert")
    factorized = CompacterModel(model, ["attn.o"], hypercomplex_division=4, factorized_phm_rule=True,
                                reduction_factor=4, name="factorized")
    rule = factorized.shared_modules["phm_rule"]
    assert rule.left.shape == (4, 4, 1) and rule.right.shape == (4, 1, 4) and rule.matrices().shape == (4, 4, 4)
    fixed = CompacterModel(model, ["attn.o"], hypercomplex_division=4, learn_phm=False, reduction_factor=4,
                           name="fixed").freeze_module()
    assert "rule" in fixed.shared_modules["phm_rule"]._buffers  # saved, never trained
    assert all(p.requires_grad for p in fixed.parameters())
    assert [k for k in fixed.delta_state() if "rule" in k] == ["shared::phm_rule.rule"]  # saved once
    per_layer = CompacterModel(model, ["attn.o"], hypercomplex_division=4, shared_phm_rule=False,
                               reduction_factor=4, name="per_layer")
    assert not per_layer.shared_modules and len({id(l.rule()) for l in _phm_layers(per_layer)}) == 4
    torch.manual_seed(0)
    small = CompacterModel(model, ["attn.o"], hypercomplex_division=4, hypercomplex_nonlinearity="normal",
                           phm_init_range=1e-3, reduction_factor=4, name="small")
    left = torch.cat([l.left.flatten() for l in _phm_layers(small)])
    assert 0.5e-3 < left.std().item() < 2e-3
    uniform = CompacterModel(model, ["attn.o"], hypercomplex_division=4, phm_c_init="uniform",
                             reduction_factor=4, name="uniform")
    assert uniform.shared_modules["phm_rule"].rule.abs().max() <= 0.01


# --- prefix tuning -------------------------------------------------------------------------------


def test_prefix_reparameterization_is_one_mlp_for_all_layers_and_folds_into_plain_prefixes(tmp_path):
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    delta = PrefixModel(model, prefix_token_num=3, embed_dim=16, mid_dim=24).freeze_module()
    mlp = delta.shared_modules["reparameterization"]
    width = 2 * 8  # 2 key/value heads × head size 8
    assert mlp.output.weight.shape == (2 * 2 * width, 24)  # keys and values of both layers
    assert delta.num_trainable_parameters() == 3 * 16 + (16 * 24 + 24) + (24 + 1) * 2 * 2 * width
    assert sum(delta.trainable_parameters_by_module().values()) == 0  # all in the shared MLP
    perturb(delta)
    main_tensor(model(**inputs)).pow(2).mean().backward()
    assert mlp.output.weight.grad[: 2 * width].abs().sum() > 0 and mlp.output.weight.grad[2 * width:].abs().sum() > 0
    expected = output(model, inputs)
    delta.fold()
    assert not delta.shared_modules and delta.config.reparameterize is False
    assert delta.num_trainable_parameters() == 2 * 2 * 3 * width
    torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=1e-6)
    delta.save_finetuned(tmp_path)
    fresh = tiny_model("llama")
    AutoDeltaModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(output(fresh, inputs), output(model, inputs))


def test_prefix_estimates_size_the_shared_mlp_for_every_layer():
    from engine import AutoDeltaConfig, estimate_delta

    model = load_backbone("catalog:llama-3-8b").model
    config = AutoDeltaConfig.from_dict({"delta_type": "prefix", "prefix_token_num": 4})
    built = PrefixModel(model, config=config, attach=False)
    assert estimate_delta(model, config).total == built.num_trainable_parameters()
    assert built.num_trainable_parameters() == 4 * 512 + (512 * 512 + 512) + (512 + 1) * 32 * 2 * 1024


# --- LoRA on embeddings ----------------------------------------------------------------------------


def test_lora_on_an_embedding_starts_with_a_zero_and_never_moves_the_padding_row():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 6, padding_idx=0)
    model = torch.nn.Sequential(embedding)
    delta = LoraModel(model, ["0"], lora_r=2)
    layer = delta.delta_modules["0"]
    assert torch.equal(layer.lora_embedding_A, torch.zeros(2, 10))
    assert layer.lora_embedding_B.std() > 0.5  # normal init
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.tensor([[0, 3, 4, 0]])).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(model(torch.tensor([0])), embedding.weight[:1].detach())  # padding row unchanged
    assert not torch.equal(model(torch.tensor([3])), embedding.weight[3:4].detach())
