"""PEFT adapters as people save them: a classifier head in ``modules_to_save``, axolotl's
embeddings, ``layers_to_transform``, Linear subclasses, ``target_modules`` null or
``"all-linear"``, ``exclude_modules`` — each compared with PEFT's own outputs, in float64."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from engine import (
    ConfigError,
    IA3Model,
    LoraModel,
    base_model_id,
    export_peft,
    import_peft,
    load_backbone,
    peft_adapter_config,
)
from tests.engine.test_delta_matrix import perturb
from tests.engine.tiny import TINY_CONFIGS, main_tensor, tiny_inputs


def _trained(model, config, directory):
    """A PEFT adapter as PEFT trains it: every trainable tensor moved off its initial value."""
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


def _classifier(seed: int = 0):
    torch.manual_seed(seed)
    config = TINY_CONFIGS["bert"]()
    config.num_labels = 3
    return transformers.BertForSequenceClassification(config).eval().double()


def _llama(seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = tied
    return transformers.LlamaForCausalLM(config).eval().double()


def _logits(model, inputs):
    with torch.no_grad():
        return main_tensor(model(**inputs))


def _no_deltas(model) -> bool:
    return not any(getattr(m, "is_delta_module", False) for m in model.modules())


# --- modules_to_save --------------------------------------------------------------------------


def test_a_sequence_classification_adapter_with_its_head_imports_with_equal_outputs(tmp_path):
    inputs = tiny_inputs("bert")
    theirs = _trained(_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) == {"classifier", "score"}  # as PEFT writes it
    model = _classifier()
    delta = import_peft(tmp_path, model)
    assert delta.unfrozen_paths == ["classifier"]
    torch.testing.assert_close(_logits(model, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)
    assert not model.classifier.weight.requires_grad  # inference: nothing trains
    trainable = import_peft(tmp_path, _classifier(), is_trainable=True)
    head = trainable.backbone_model.classifier.weight
    assert head.requires_grad and trainable.num_trainable_parameters() == 4 * 2 * (4 * 32 + 32 * 4) // 2 + 3 * 32 + 3


def test_a_delta_with_an_unfrozen_head_exports_it_as_modules_to_save(tmp_path):
    inputs = tiny_inputs("bert")
    model = _classifier()
    delta = LoraModel(model, ["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta)
    with torch.no_grad():
        model.classifier.weight.add_(0.3)
    ours = _logits(model, inputs)
    export_peft(delta, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["target_modules"] == ["query", "value"]
    peft_model = PeftModel.from_pretrained(_classifier(), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, inputs), ours, rtol=0, atol=1e-12)
    back = import_peft(tmp_path, _classifier())
    assert torch.equal(_logits(back.backbone_model, inputs), ours)


def test_axolotl_style_embeddings_and_head_in_modules_to_save(tmp_path):
    inputs = tiny_inputs("llama")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    theirs = _trained(_llama(), config, tmp_path)
    model = _llama()
    delta = import_peft(tmp_path, model)
    assert delta.unfrozen_paths == ["model.embed_tokens", "lm_head"]
    torch.testing.assert_close(_logits(model, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)
    tied = _llama(tied=True)
    with pytest.raises(ConfigError, match="shares its weight with.*tied"):
        import_peft(tmp_path, tied)  # PEFT trains an untied copy: loading it into one tensor would differ
    assert _no_deltas(tied)


# --- which modules ---------------------------------------------------------------------------


def test_layers_to_transform_import_and_compact_export(tmp_path):
    inputs = tiny_inputs("llama")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    theirs = _trained(_llama(), config, tmp_path / "peft")
    model = _llama()
    delta = import_peft(tmp_path / "peft", model)
    assert delta.modified_paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(_logits(model, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)
    export_peft(delta, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["target_modules"], written["layers_to_transform"], written["layers_pattern"]) == (
        ["q_proj", "v_proj"], [1], "layers")
    again = PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)


def test_exports_name_modules_compactly_on_a_large_model():
    backbone = load_backbone("catalog:llama-3-8b", weights=False)
    everywhere = peft_adapter_config(LoraModel(backbone.model, ["attn.q", "attn.v"], attach=False),
                                     base_model_id(backbone.source))
    assert everywhere["target_modules"] == ["q_proj", "v_proj"] and "layers_to_transform" not in everywhere
    assert everywhere["base_model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    half = LoraModel(backbone.model, [r"[r]layers\.([0-9]|1[0-5])\.self_attn\.(q|v)_proj"], attach=False)
    config = peft_adapter_config(half)
    assert config["layers_to_transform"] == list(range(16)) and config["target_modules"] == ["q_proj", "v_proj"]
    assert base_model_id("catalog:gpt2") == "openai-community/gpt2" and base_model_id("arch:bert") is None
    assert base_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"


def test_linear_subclasses_and_null_target_modules(tmp_path, caplog):
    torch.manual_seed(0)
    falcon_config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              vocab_size=99, new_decoder_architecture=False)
    build = lambda: transformers.FalconForCausalLM(falcon_config).eval().double()  # noqa: E731
    torch.manual_seed(0)
    original = build()
    assert type(original.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"
    theirs = _trained(original, LoraConfig(r=4), tmp_path)  # PEFT's defaults for falcon
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    written["target_modules"] = None  # as some hand-written configs have it
    (tmp_path / "adapter_config.json").write_text(json.dumps(written))
    torch.manual_seed(0)
    model = build()
    with caplog.at_level(logging.INFO, logger="engine.interop.peft_matching"):
        delta = import_peft(tmp_path, model)
    assert "PEFT's default target_modules for model type 'falcon'" in caplog.text
    assert delta.modified_paths == [f"transformer.h.{i}.self_attention.query_key_value" for i in range(2)]
    inputs = tiny_inputs("llama")
    torch.testing.assert_close(_logits(model, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)


def test_all_linear_and_exclude_modules(tmp_path):
    inputs = tiny_inputs("llama")
    config = LoraConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj"])
    theirs = _trained(_llama(), config, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    written["target_modules"] = "all-linear"
    (tmp_path / "adapter_config.json").write_text(json.dumps(written))
    model = _llama()
    delta = import_peft(tmp_path, model)
    names = {p.rsplit(".", 1)[-1] for p in delta.modified_paths}
    assert names == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head, no o_proj
    torch.testing.assert_close(_logits(model, inputs), _logits(theirs, inputs), rtol=0, atol=1e-12)


def test_ia3_exports_compact_feedforward_entries(tmp_path):
    inputs = tiny_inputs("llama")
    model = _llama()
    delta = IA3Model(model)
    perturb(delta)
    ours = _logits(model, inputs)
    export_peft(delta, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written["feedforward_modules"]) <= set(written["target_modules"])
    assert all("." not in t for t in written["target_modules"])
    peft_model = PeftModel.from_pretrained(_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, inputs), ours, rtol=0, atol=1e-12)
    assert IA3Config  # the type PEFT reads it as


def test_a_missing_modules_to_save_tensor_is_a_checkpoint_error(tmp_path):
    _trained(_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**written, "modules_to_save": ["lm_head"]}))
    model = _llama()
    with pytest.raises(Exception, match="miss trained tensors: lm_head.weight"):
        import_peft(tmp_path, model)
    assert _no_deltas(model)
