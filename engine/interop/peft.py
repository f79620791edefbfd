"""PEFT's adapter layout: ``adapter_config.json`` for LoRA deltas.

Target modules are written as full module paths, which PEFT matches exactly (a key equal to a
target, or ending in ``.`` + target), so the adapter lands on the same modules.
"""

from __future__ import annotations

from typing import Any

from engine.delta import DeltaBase
from engine.errors import ConfigError


def peft_adapter_config(
    delta: DeltaBase, base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT needs for ``delta``; refused (naming why) if PEFT cannot
    express it."""
    if delta.delta_type != "lora":
        raise ConfigError(f"PEFT export covers LoRA here; this delta is {delta.delta_type}")
    modules = dict(delta.backbone_model.named_modules())
    kinds = {type(modules[p]).__name__ for p in delta.modified_paths}
    if len(kinds) > 1:
        raise ConfigError(f"PEFT needs one layer kind per LoRA config; this one wraps {', '.join(sorted(kinds))}")
    config = delta.config
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(delta.modified_paths),
        "fan_in_fan_out": kinds == {"Conv1D"},
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": False,
    }
