"""Bad input and damaged checkpoints: clear errors, and the backbone is left untouched."""

import json

import pytest
import torch

from engine import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CheckpointError,
    ConfigError,
    DeltaStateError,
    LoraModel,
    ModuleNotSupportedError,
    NoMatchError,
    PrefixModel,
    load_backbone,
)
from tests.engine.test_delta_matrix import output, perturb
from tests.engine.tiny import tiny_inputs, tiny_model

# --- bad input ----------------------------------------------------------------------------------


def _untouched(model, inputs, reference):
    assert not any(getattr(m, "is_delta_module", False) for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(output(model, inputs), reference)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda m: AutoDeltaModel.from_config({"delta_type": "loar"}, m), ConfigError,
         r"unknown delta_type 'loar'; registered methods: adapter, bitfit, .*lora, .*prefix"),
        (lambda m: LoraModel(m, lora_r=0), ConfigError, "lora_r must be a positive integer, got 0"),
        (lambda m: LoraModel(m, lora_r=2.5), ConfigError, "lora_r must be a positive integer"),
        (lambda m: LoraModel(m, lora_dropout=1.5), ConfigError, r"lora_dropout must be in \[0, 1\)"),
        (lambda m: LoraModel(m, lora_rank=4), ConfigError, "unknown lora option.*lora_rank.*valid options"),
        (lambda m: LoraModel(m, ["LayerNorm"]), ModuleNotSupportedError,
         r"lora cannot wrap 'embeddings.LayerNorm', a LayerNorm; it wraps Linear, Conv1D"),
        (lambda m: AdapterModel(m, route="sideways"), ConfigError, "does not support route 'sideways'"),
        (lambda m: AdapterModel(m, non_linearity="swishy"), ConfigError, "non_linearity must be one of"),
        (lambda m: LoraModel(m, ["qeury"]), NoMatchError, "'qeury' matches no module.*query"),
        (lambda m: LoraModel(m, []), ConfigError, "modified_modules is empty"),
        (lambda m: LoraModel(m, ["query"], ["query"]), ConfigError, "removed every module"),
        (lambda m: PrefixModel(m, ["intermediate"]), ModuleNotSupportedError,
         "prefix cannot wrap .encoder.layer.0.intermediate.*attention modules"),
        (lambda m: LoraModel(m, name="has.dot"), ConfigError, "must be a Python identifier"),
        (lambda m: BitFitModel(m, ["dropout"]), ModuleNotSupportedError, "bitfit cannot wrap .*take a bias"),
    ],
)
def test_bad_input_raises_and_leaves_the_backbone_unmodified(build, error, message):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    reference = output(model, inputs)
    with pytest.raises(error, match=message):
        build(model)
    _untouched(model, inputs, reference)


def test_checkpoint_from_another_backbone_is_refused_with_the_differences(tmp_path):
    source = tiny_model("bert")
    LoraModel(source, ["query"]).freeze_module().save_finetuned(tmp_path)
    import transformers

    three_layers = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
        vocab_size=99, max_position_embeddings=64)).eval()
    with pytest.raises(CheckpointError, match="another backbone.*this backbone only: encoder.layer.2"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=three_layers)
    wider = transformers.BertModel(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=99, max_position_embeddings=64)).eval()
    with pytest.raises(CheckpointError, match=r"another structure.*check_hash=False"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=wider)
    with pytest.raises(CheckpointError, match=r"shapes do not fit.*\(8, 32\) vs \(8, 48\)"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=wider, check_hash=False)
    assert not any(getattr(m, "is_delta_module", False) for m in wider.modules())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_weights", "bad_json", "no_config"])
def test_damaged_checkpoints_are_refused_and_the_backbone_stays_clean(tmp_path, damage):
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    reference = output(model, inputs)
    delta = LoraModel(tiny_model("bert")).freeze_module()
    perturb(delta)
    delta.save_finetuned(tmp_path)
    weights, config = tmp_path / "delta.safetensors", tmp_path / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    else:
        config.unlink()
    with pytest.raises(CheckpointError):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    _untouched(model, inputs, reference)


def test_checkpoint_with_unexpected_keys_lists_them(tmp_path):
    from safetensors.torch import load_file, save_file

    delta = LoraModel(tiny_model("bert")).freeze_module()
    delta.save_finetuned(tmp_path)
    tensors = load_file(tmp_path / "delta.safetensors")
    tensors["encoder.layer.0.attention.self.query.lora_C.weight"] = torch.zeros(1)
    del tensors["encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(tensors, tmp_path / "delta.safetensors")
    with pytest.raises(CheckpointError, match="missing encoder.layer.1.attention.self.value.lora_B.weight; "
                                              "unexpected encoder.layer.0.attention.self.query.lora_C.weight"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=tiny_model("bert"))


def test_saving_a_meta_delta_is_refused(tmp_path):
    delta = LoraModel(load_backbone("catalog:bert-base-uncased").model).freeze_module()
    with pytest.raises(DeltaStateError, match="meta backbone"):
        delta.save_finetuned(tmp_path)
    assert not list(tmp_path.iterdir())


def test_checkpoint_config_is_readable_json_with_the_resolved_modules(tmp_path):
    delta = LoraModel(tiny_model("bert"), ["query"], lora_r=4, lora_alpha=8).freeze_module()
    delta.save_finetuned(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["delta_type"] == "lora" and config["lora_r"] == 4
    assert config["resolved_modules"] == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert AutoDeltaConfig.from_finetuned(tmp_path) == delta.config


def test_an_attach_that_fails_halfway_leaves_no_hook_or_module_behind(monkeypatch):
    import torch

    from engine import AdapterModel, DeltaModule
    from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model

    model = tiny_model("bert")
    before = main_tensor(model(**tiny_inputs("bert")))
    delta = AdapterModel(model, ["attn.o"], attach=False)
    original, calls = AdapterModel.wire, []

    def wire_then_fail(self, path, module, layer):  # the second module fails to wire
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("wiring failed")
        return original(self, path, module, layer)

    monkeypatch.setattr(AdapterModel, "wire", wire_then_fail)
    with pytest.raises(RuntimeError, match="wiring failed"):
        delta.attach()
    assert not delta.is_attached
    assert not any(isinstance(m, DeltaModule) for m in model.modules())
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.add_(1.0)  # if a hook were left, the output would move
    assert torch.equal(main_tensor(model(**tiny_inputs("bert"))), before)
    monkeypatch.setattr(AdapterModel, "wire", original)
    delta.attach().detach()  # and it can be attached properly afterwards
