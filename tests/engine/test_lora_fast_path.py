"""Unmerged LoRA inference adds its update into the layer output in place (LoraLayer.add_into);
it must compute exactly what the general path computes, and step aside whenever it cannot."""

from __future__ import annotations

import pytest
import torch

import engine
from tests.engine.tiny import main_tensor, tiny_inputs, tiny_model


def _trained_lora(model: torch.nn.Module, **settings: object) -> engine.LoraModel:
    delta = engine.LoraModel(model, ["attn.q", "attn.v"], **settings)
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    return delta


def _uses_fast_path(delta: engine.LoraModel, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    layer_class = type(next(iter(delta.delta_modules.values())))
    original = layer_class.add_into

    def spy(self, hidden, target):  # type: ignore[no-untyped-def]
        used = original(self, hidden, target)
        calls.append(used)
        return used

    monkeypatch.setattr(layer_class, "add_into", spy)
    return calls


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_inference_takes_the_fast_path_and_equals_the_general_one(kind, monkeypatch):
    model = tiny_model(kind, dtype=torch.float64)
    delta = _trained_lora(model, lora_dropout=0.2)
    inputs = tiny_inputs(kind)
    calls = _uses_fast_path(delta, monkeypatch)
    with torch.inference_mode():
        fast = main_tensor(model(**inputs))
    assert calls and all(calls)  # every LoRA layer took it
    calls.clear()
    general = main_tensor(model(**inputs))  # grad enabled, parameters trainable: general path
    assert calls and not any(calls)
    assert (fast - general).abs().max().item() <= 1e-12
    delta.merge()
    with torch.inference_mode():
        merged = main_tensor(model(**inputs))
    assert (fast - merged).abs().max().item() <= 1e-10


def test_training_with_dropout_never_takes_the_fast_path(monkeypatch):
    model = tiny_model("bert").train()
    delta = _trained_lora(model, lora_dropout=0.5)
    calls = _uses_fast_path(delta, monkeypatch)
    with torch.no_grad():
        torch.manual_seed(0)
        first = main_tensor(model(**tiny_inputs("bert")))
        torch.manual_seed(1)
        second = main_tensor(model(**tiny_inputs("bert")))
    assert calls and not any(calls)
    assert not torch.allclose(first, second)  # dropout really ran


def test_a_hook_on_the_delta_module_is_honoured_by_leaving_the_fast_path():
    """FSDP2 (and user hooks) act through the module's own hooks: the delta must then be called."""
    model = tiny_model("bert")
    delta = _trained_lora(model)
    seen: list[str] = []
    for path, layer in delta.delta_modules.items():
        layer.register_forward_pre_hook(lambda module, args, path=path: seen.append(path))
    with torch.inference_mode():
        model(**tiny_inputs("bert"))
    assert sorted(seen) == sorted(delta.delta_modules)


def test_a_float32_delta_on_a_bfloat16_backbone_still_casts(monkeypatch):
    model = tiny_model("llama", dtype=torch.bfloat16)
    delta = _trained_lora(model)
    calls = _uses_fast_path(delta, monkeypatch)
    with torch.inference_mode():
        output = main_tensor(model(**tiny_inputs("llama")))
    assert calls and not any(calls) and output.dtype == torch.bfloat16
