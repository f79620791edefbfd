"""QLoRA: deltas on bitsandbytes 4-bit and 8-bit backbones (on the CPU), compared with PEFT's
QLoRA on the same quantised weights — outputs and gradients — and the quantised sizes planned on
meta shapes compared with what loading really takes."""

from __future__ import annotations

import bitsandbytes  # noqa: F401 - the [quant] extra: installed by `make test`, so these never skip
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from engine import (
    AdapterModel,
    BitFitModel,
    ConfigError,
    DeltaStateError,
    IA3Model,
    LoraModel,
    ModuleNotSupportedError,
    ModuleTree,
    import_peft,
    load_backbone,
)
from engine.quantization import BLOCK_SIZE, weight_format
from tests.engine.tiny import TINY_CONFIGS, tiny_inputs

FORMATS = ["nf4", "fp4", "int8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama saved as safetensors, wide enough for 4-bit blocks."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return directory, model


def _measured_bytes(model) -> int:
    """What the loaded weights really take: packed bytes, plus 4-bit blocks' float32 scales and
    8-bit rows' scales."""
    total = 0
    for parameter in {id(p): p for p in model.parameters()}.values():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scale = getattr(parameter, "SCB", None)
        if scale is not None:
            total += scale.numel() * 4
    return total


@pytest.mark.parametrize("quantization", FORMATS)
def test_quantised_loading_keeps_true_shapes_and_meta_plans_its_bytes(checkpoint, quantization):
    directory, reference = checkpoint
    loaded = load_backbone(str(directory), quantization=quantization)
    query = loaded.model.model.layers[0].self_attn.q_proj
    assert weight_format(query) == quantization and loaded.quantization == quantization
    assert type(loaded.model.lm_head).__name__ == "Linear"  # the head stays unquantised
    tree = ModuleTree.from_model(loaded.model)
    assert tree.root.total_parameters == sum(p.numel() for p in reference.parameters())
    assert tree.node("model.layers.0.self_attn.q_proj").parameters[0].shape == (64, 64)
    planned = load_backbone(str(directory), weights=False, quantization=quantization)
    assert planned.is_meta and planned.weight_bytes() == _measured_bytes(loaded.model)


def test_a_large_shape_is_planned_quantised_without_memory():
    plain = load_backbone("catalog:llama-3-8b", weights=False)
    nf4 = load_backbone("catalog:llama-3-8b", weights=False, quantization="nf4")
    linear = sum(m.in_features * m.out_features for m in plain.model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not plain.model.lm_head)
    rest = plain.num_parameters() - linear
    assert nf4.weight_bytes(other_bytes=2) == linear // 2 + 4 * (linear // BLOCK_SIZE) + 2 * rest
    assert nf4.weight_bytes(other_bytes=2) < 0.4 * plain.weight_bytes(other_bytes=2)
    with pytest.raises(ConfigError, match="quantization must be one of nf4, fp4, int8; got 'int3'"):
        load_backbone("catalog:gpt2", weights=False, quantization="int3")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lora_trains_on_a_quantised_backbone_and_only_its_tensors_change(checkpoint, quantization):
    directory, _ = checkpoint
    model = load_backbone(str(directory), quantization=quantization).model
    delta = LoraModel(model, ["q_proj", "v_proj"], lora_r=4, lora_dropout=0.1)
    assert delta.delta_modules["model/layers/0/self_attn/q_proj"].lora_A.weight.shape == (4, 64)
    delta.freeze_module()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = tiny_inputs("llama")
    losses = []
    for _ in range(5):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(".lora" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=f"cannot merge a LoRA update into .*{quantization}-quantised"):
        delta.merge()
    assert delta.is_attached and not delta.is_merged


def test_dora_is_refused_on_quantised_layers(checkpoint):
    model = load_backbone(str(checkpoint[0]), quantization="nf4").model
    with pytest.raises(ModuleNotSupportedError, match="use_dora cannot wrap .*nf4-quantised"):
        LoraModel(model, ["q_proj"], use_dora=True)


@pytest.mark.parametrize("method, options", [
    (AdapterModel, {"modified_modules": ["o_proj"], "bottleneck_dim": 8}),
    (IA3Model, {"modified_modules": ["k_proj", "down_proj"]}),
    (BitFitModel, {"modified_modules": ["q_proj"]}),
])
def test_other_methods_attach_to_quantised_layers(checkpoint, method, options):
    model = load_backbone(str(checkpoint[0]), quantization="nf4").model
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    delta = method(model, **options)
    delta.freeze_module()
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.add_(0.1)
        after = model(**inputs).logits
    assert not torch.allclose(before, after)
    model(**inputs).logits.sum().backward()
    grads = [p.grad for p in delta.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_peft_qlora_adapter_imports_with_equal_outputs_and_gradients(checkpoint, tmp_path):
    directory, _ = checkpoint
    inputs = tiny_inputs("llama")
    theirs = get_peft_model(load_backbone(str(directory), quantization="nf4").model,
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    theirs.save_pretrained(tmp_path)
    ours_model = load_backbone(str(directory), quantization="nf4").model
    delta = import_peft(tmp_path, ours_model, is_trainable=True)
    theirs.eval()
    ours_model.eval()
    their_loss = theirs(**inputs, labels=inputs["input_ids"]).loss
    our_loss = ours_model(**inputs, labels=inputs["input_ids"]).loss
    torch.testing.assert_close(our_loss, their_loss, rtol=0, atol=1e-5)
    their_loss.backward()
    our_loss.backward()
    theirs_by_name = {n.replace("base_model.model.", "").replace(".default", ""): p
                      for n, p in theirs.named_parameters() if p.requires_grad}
    for name, parameter in ours_model.named_parameters():
        if parameter.requires_grad:
            their = theirs_by_name[name.replace(".lora.lora_", ".lora_")]
            torch.testing.assert_close(parameter.grad, their.grad, rtol=1e-4, atol=1e-6)
    assert delta.num_trainable_parameters() == sum(p.numel() for p in theirs_by_name.values()) == 1792


def test_ibert_quant_linear_is_recognised_by_its_declared_sizes():
    torch.manual_seed(0)
    model = transformers.IBertModel(transformers.IBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
        max_position_embeddings=64, quant_mode=True)).eval()
    delta = LoraModel(model, ["query", "value"], lora_r=2)
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "QuantLinear"
    assert delta.num_trainable_parameters() == 4 * (2 * 32 + 32 * 2)
    with pytest.raises(DeltaStateError, match="QuantLinear: its forward is its own"):
        delta.merge()
    scaled = IA3Model(model, ["key"])  # IA3 too: a declared linear layer
    assert scaled.num_trainable_parameters() == 2 * 32


def _dequantised_copy(quantised, reference):
    """A float model computing with exactly the weights the 4-bit model holds."""
    import bitsandbytes.functional as bnb_functional

    twin = transformers.LlamaForCausalLM(reference.config).eval()
    twin.load_state_dict(reference.state_dict())
    layers = dict(quantised.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, torch.nn.Linear) and weight_format(layers[name]) is not None:
                weight = layers[name].weight
                module.weight.copy_(bnb_functional.dequantize_4bit(weight.data, weight.quant_state))
    return twin


def test_gradients_through_4bit_layers_equal_those_of_the_dequantised_weights(checkpoint):
    """Also after an inference pass (which makes bitsandbytes repack its CPU weights into a format
    without a backward): every delta, the first layer's included, gets its full gradient."""
    directory, reference = checkpoint
    inputs = tiny_inputs("llama")
    model = load_backbone(str(directory), quantization="nf4").model
    with torch.no_grad():
        model(**inputs)  # eval mode, no grad: the pass that repacks 4-bit weights on CPUs that can
    twin = _dequantised_copy(model, reference)
    ours = IA3Model(model, modified_modules=["k_proj", "down_proj"])
    theirs = IA3Model(twin, modified_modules=["k_proj", "down_proj"])
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.add_(0.1)
            b.copy_(a)
    for model_ in (model, twin):
        model_(**inputs, labels=inputs["input_ids"]).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "t5", "opt"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_planned_quantised_bytes_equal_what_bitsandbytes_allocates(kind, quantization, tmp_path):
    """GPT-2's Conv1D layers are quantised, T5's ``wo`` stays float32 and BERT's pooler is
    quantised, as transformers' loading does: the meta plan equals the loaded bytes exactly."""
    torch.manual_seed(0)
    transformers_class = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertModel,
                          "t5": transformers.T5ForConditionalGeneration, "opt": transformers.OPTForCausalLM}[kind]
    transformers_class(TINY_CONFIGS[kind]()).save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), quantization=quantization)
    planned = load_backbone(str(tmp_path), weights=False, quantization=quantization)
    assert any(weight_format(m) == quantization for m in loaded.model.modules())
    assert planned.weight_bytes() == _measured_bytes(loaded.model)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_on_8bit_layers_trains_with_the_gradients_of_the_dequantised_model(kind, tmp_path):
    """bitsandbytes' 8-bit matmul on CPU returns a view autograd cannot change in place, which
    LoRA's in-place add tripped over in training (BERT's biased layers). The gradients through
    8-bit layers equal those of the same model with the dequantised weights."""
    config = TINY_CONFIGS[kind]()
    config.hidden_size, config.intermediate_size = 64, 128
    model_class = {"bert": transformers.BertForMaskedLM, "llama": transformers.LlamaForCausalLM}[kind]
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    quantised = load_backbone(str(tmp_path), quantization="int8").model
    reference = model_class.from_pretrained(tmp_path)
    for name, module in quantised.named_modules():
        if weight_format(module) == "int8":
            weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
            reference.get_submodule(name).weight.data.copy_(weight)
    grads = []
    inputs = tiny_inputs(kind)
    for model in (quantised, reference):
        torch.manual_seed(1)
        delta = LoraModel(model, ["attn.q", "attn.v"], lora_r=4)
        with torch.no_grad():
            for parameter in delta.parameters():
                parameter.normal_(0, 0.1)
        delta.freeze_module()
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, gradient in grads[1].items():
        assert gradient.abs().sum() > 0
        torch.testing.assert_close(grads[0][name], gradient, rtol=1e-4, atol=1e-6)
