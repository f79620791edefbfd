"""Exact outputs of AutoDelta's defaults on tiny real-weight builds of eight architecture families
whose module names no table lists: attaching changes nothing, LoRA equals the weights edited by
hand, detaching and a save/load round trip restore the outputs bit for bit."""

import pytest
import torch
import transformers

from engine import AutoDeltaModel, ModuleTree
from engine import AutoDeltaModel as _Auto
from engine.roles import COMMON_NAME_MAP
from engine.roles.kinds import is_channels_first
from engine.tree import all_modules
from tests.engine.test_delta_matrix import perturb
from tests.engine.tiny import main_tensor

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
IDS = torch.tensor([[5, 17, 3, 42, 8, 1]])
PIXELS = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)

TINY = {
    "electra": (lambda: transformers.ElectraModel(transformers.ElectraConfig(
        **SMALL, embedding_size=32, vocab_size=99)), {"input_ids": IDS}),
    "gpt_neox": (lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(
        **SMALL, vocab_size=99)), {"input_ids": IDS}),
    "pegasus": (lambda: transformers.PegasusModel(transformers.PegasusConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=99)),
        {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        **SMALL, image_size=32, patch_size=8)), {"pixel_values": PIXELS}),
    "whisper": (lambda: transformers.WhisperModel(transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16, vocab_size=99,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
        {"input_features": torch.linspace(-1, 1, 8 * 32).reshape(1, 8, 32), "decoder_input_ids": IDS[:, :3]}),
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config={**SMALL, "vocab_size": 99}, vision_config={**SMALL, "image_size": 32, "patch_size": 8},
        projection_dim=16)), {"input_ids": IDS, "pixel_values": PIXELS}),
    "qwen2_moe": (lambda: transformers.Qwen2MoeModel(transformers.Qwen2MoeConfig(
        **SMALL, num_key_value_heads=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_experts=4, num_experts_per_tok=2, vocab_size=99)), {"input_ids": IDS}),
    "mamba": (lambda: transformers.MambaModel(transformers.MambaConfig(
        hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=99)), {"input_ids": IDS}),
}


def build(kind: str) -> torch.nn.Module:
    """Built in float64, so comparisons tell rounding from a bug at 1e-10 (experts run eagerly:
    grouped matmuls take float32 only)."""
    torch.manual_seed(0)
    model = TINY[kind][0]().eval().double()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def run(model, kind: str) -> torch.Tensor:
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in TINY[kind][1].items()}
    with torch.no_grad():
        result = model(**inputs)
    if isinstance(result, transformers.utils.ModelOutput) and getattr(result, "text_embeds", None) is not None:
        return torch.cat([result.text_embeds, result.image_embeds])  # CLIP: both towers
    return main_tensor(result)


def edit_by_hand(kind: str, delta) -> torch.nn.Module:
    """A fresh copy with each LoRA update written into the wrapped weight (no hooks)."""
    reference = build(kind)
    modules = all_modules(reference)
    with torch.no_grad():
        for path in delta.modified_paths:
            layer = delta.delta_modules[path.replace(".", "/")]
            weight = modules[path].weight
            if is_channels_first(modules[path]):  # pointwise convolution: (out, in, 1)
                update = layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)
            else:
                update = layer.lora_B.weight @ layer.lora_A.weight
            weight += (update * layer.scaling).reshape(weight.shape)
    return reference


def test_the_sample_is_not_covered_by_the_table():
    for kind in TINY:
        assert build(kind).config.model_type not in COMMON_NAME_MAP, kind


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit"])
def test_default_deltas_give_exact_outputs(kind, method, tmp_path):
    model = build(kind)
    before = run(model, kind)
    delta = AutoDeltaModel.from_config({"delta_type": method}, model)
    assert delta.modified_paths and delta.num_trainable_parameters() > 0
    assert torch.equal(run(model, kind), before), "attaching must not change the outputs"
    perturb(delta)
    changed = run(model, kind)
    assert (changed - before).abs().max() > 1e-3, "a trained delta must change the outputs"
    if method == "lora":
        torch.testing.assert_close(changed, run(edit_by_hand(kind, delta), kind), rtol=0, atol=1e-10)
    delta.freeze_module().save_finetuned(tmp_path / method)
    delta.detach()
    assert torch.equal(run(model, kind), before), "detaching must restore the outputs exactly"
    fresh = build(kind)
    _Auto.from_finetuned(tmp_path / method, fresh)
    assert torch.equal(run(fresh, kind), changed), "a saved delta must load back bit for bit"
    assert ModuleTree.from_model(fresh).total_parameters > 0
