"""A delta trains under transformers.Trainer; its checkpoints hold only delta tensors; resuming
continues exactly where an uninterrupted run would be."""

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from train_with_trainer import train  # noqa: E402


def delta_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}


def test_trainer_trains_saves_only_deltas_and_resumes_exactly(tmp_path):
    straight = train(str(tmp_path / "straight"), steps=20, save_steps=10)
    losses = [e["loss"] for e in straight.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] * 0.95, losses
    frozen = [n for n, p in straight.model.named_parameters() if not p.requires_grad]
    assert frozen and all(".lora." not in n for n in frozen)
    checkpoint = tmp_path / "straight" / "checkpoint-10"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys and all(".lora.lora_" in k for k in keys)
    assert len(keys) == 2 * 7 * 2  # 2 layers × 7 projections × (A, B)
    resumed = train(str(tmp_path / "resumed"), steps=20, save_steps=10, resume=str(checkpoint))
    assert resumed.state.global_step == 20
    expected, actual = delta_tensors(straight.model), delta_tensors(resumed.model)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)
