"""Deltas to and from PEFT's adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.<tensor>``.

LoRA (with rsLoRA, DoRA and per-module ranks/alphas), IA3 and soft prompts (prompt tuning)
move both ways. Target modules are written as full module paths, which PEFT matches exactly; on
import, PEFT's own matching rules (suffix lists, full-match regex strings, ``(.*\\.)?(key)$``
patterns) are applied to the backbone and turned into this library's expressions. What PEFT
cannot express — or what this library cannot — is refused with the feature named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.addressing import compile_selection
from engine.checkpoint import (
    read_safetensors,
    recover,
    safetensors_data,
    write_files_together,
)
from engine.delta import DeltaBase
from engine.errors import CheckpointError, ConfigError
from engine.persistence import set_trainable
from engine.roles import ModelStructure
from engine.roles.kinds import is_fused_experts
from engine.tree import ModuleTree, all_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_LAYERS = ("Linear", "Conv1D", "Embedding", "Conv2d")


# --- export ------------------------------------------------------------------------------------


def peft_adapter_config(
    delta: DeltaBase, base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT needs for ``delta``; refused (naming why) otherwise."""
    kind = delta.delta_type
    if kind == "lora":
        return _lora_config(delta, base_model_name_or_path, modules_to_save)
    if kind == "ia3":
        feedforward = [p for p in delta.modified_paths if delta.delta_modules[p.replace(".", "/")].on_input]
        return {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
                "target_modules": list(delta.modified_paths), "feedforward_modules": feedforward,
                "fan_in_fan_out": _fan_in_fan_out(delta), "modules_to_save": modules_to_save or None,
                "init_ia3_weights": True, "inference_mode": False}
    if kind == "soft_prompt":
        config = getattr(delta.backbone_model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError("soft prompts on encoder-decoder models are not exported: PEFT's prompt "
                              "tuning also prompts the decoder there, this library only the encoder")
        task = "CAUSAL_LM" if hasattr(delta.backbone_model, "generate") and getattr(
            delta.backbone_model, "can_generate", lambda: False)() else "FEATURE_EXTRACTION"
        soft = next(iter(delta.delta_modules.values())).soft_embeds
        return {"peft_type": "PROMPT_TUNING", "task_type": task,
                "base_model_name_or_path": base_model_name_or_path,
                "num_virtual_tokens": soft.shape[0], "token_dim": soft.shape[1],
                "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "inference_mode": False}
    raise ConfigError(
        f"PEFT export supports lora, ia3 and soft_prompt deltas; {kind} has no PEFT equivalent "
        "with the same behaviour (save it with save_finetuned instead)"
    )


def _fan_in_fan_out(delta: DeltaBase) -> bool:
    modules = all_modules(delta.backbone_model)
    kinds = {type(modules[p]).__name__ for p in delta.modified_paths}
    if "Conv1D" in kinds and len(kinds) > 1:
        raise ConfigError(f"PEFT needs one fan_in_fan_out setting per adapter; this one wraps {', '.join(sorted(kinds))}")
    return kinds == {"Conv1D"}


def _lora_config(delta: DeltaBase, base: str | None, modules_to_save: list[str] | None) -> dict[str, Any]:
    modules = all_modules(delta.backbone_model)
    experts = [p for p in delta.modified_paths if is_fused_experts(modules[p])]
    if experts:
        raise ConfigError(
            f"LoRA factors on fused expert parameters are not exported to PEFT ({experts[0]!r}): PEFT's "
            "target_parameters keeps other tensor names and layouts; save it with save_finetuned")
    config: Any = delta.config
    settings = delta.variants(ModelStructure(delta.backbone_model), config, delta.modified_paths)
    rank_pattern = {re.escape(p): r for p, (r, _) in settings.items() if r != config.lora_r}
    alpha_pattern = {re.escape(p): a for p, (_, a) in settings.items() if a != config.lora_alpha}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
        "r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": list(delta.modified_paths), "fan_in_fan_out": _fan_in_fan_out(delta),
        "bias": "none", "modules_to_save": modules_to_save or None, "init_lora_weights": True,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": False,
    }


def _peft_tensors(delta: DeltaBase) -> dict[str, torch.Tensor]:
    if delta.delta_type == "soft_prompt":
        return {"prompt_embeddings": next(iter(delta.delta_modules.values())).soft_embeds.detach()}
    tensors = {}
    for key, tensor in delta.delta_state().items():
        if delta.delta_type == "ia3":
            path = key.rsplit(".", 1)[0]
            on_input = delta.delta_modules[path.replace(".", "/")].on_input
            tensor = tensor.reshape(1, -1) if on_input else tensor.reshape(-1, 1)
        tensors[PREFIX + key] = tensor.detach()
    return tensors


def export_peft(delta: DeltaBase, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``delta`` in PEFT's layout so ``PeftModel.from_pretrained`` loads it."""
    config = peft_adapter_config(delta, base_model_name_or_path)
    tensors = _peft_tensors(delta)
    if any(t.is_meta for t in tensors.values()):
        raise ConfigError("this delta lives on a meta backbone and has no values to export")
    return write_files_together(Path(directory), {
        WEIGHTS_FILE: safetensors_data(tensors, {"format": "pt"}),
        CONFIG_FILE: json.dumps(config, indent=2, allow_nan=False).encode()})


# --- import ------------------------------------------------------------------------------------


def _peft_targets(model: nn.Module, target: Any, kinds: tuple[str, ...]) -> list[str]:
    """The module paths PEFT would wrap: a regex string full-matches, a list matches suffixes."""
    paths = []
    for name, module in all_modules(model).items():
        if not name or type(module).__name__ not in kinds:
            continue
        if isinstance(target, str):
            hit = re.fullmatch(target, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target or [])
        if hit:
            paths.append(name)
    if not paths:
        raise ConfigError(f"the PEFT target_modules {target!r} match no supported layer of this backbone")
    return paths


def _pattern_for(paths: list[str], pattern: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT's ``(.*\\.)?(key)$`` pattern rule applied per path → explicit per-path patterns."""
    result = {}
    for path in paths:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)
        if key is not None and pattern[key] != default:
            result["[r]" + re.escape(path)] = pattern[key]
    return result


def _refuse(config: dict[str, Any], **allowed: Any) -> None:
    for name, fine in allowed.items():
        value = config.get(name)
        if value not in fine:
            raise ConfigError(f"this PEFT adapter uses {name}={value!r}, which this library cannot express; "
                              f"supported: {', '.join(map(repr, fine))}")


def import_peft(directory: str | Path, backbone_model: nn.Module, *, is_trainable: bool = False) -> DeltaBase:
    """Load a PEFT adapter directory as a delta on ``backbone_model`` (same outputs as PEFT).

    As PEFT's ``is_trainable=False``: for inference the model is put in ``eval()`` and nothing
    requires grad; ``is_trainable=True`` freezes the backbone and leaves the delta trainable.
    """
    from engine.auto import AutoDeltaModel

    directory = Path(directory)
    recover(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}: not a PEFT adapter directory") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{CONFIG_FILE} in {str(directory)!r} is not valid JSON: {error}") from error
    kind = config.get("peft_type")
    tree = ModuleTree.from_model(backbone_model)
    raw = read_safetensors(directory / WEIGHTS_FILE)
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items() if ".base_layer." not in k}
    if kind == "LORA":
        _refuse(config, bias=("none", None), modules_to_save=(None, []), layers_to_transform=(None,),
                lora_bias=(False, None), target_parameters=(None, []))
        paths = _peft_targets(backbone_model, config.get("target_modules"), LORA_LAYERS)
        delta_config = {"delta_type": "lora", "modified_modules": compile_selection(tree, paths),
                        "lora_r": config["r"], "lora_alpha": config["lora_alpha"],
                        "lora_dropout": config.get("lora_dropout", 0.0),
                        "use_rslora": bool(config.get("use_rslora")), "use_dora": bool(config.get("use_dora")),
                        "rank_pattern": _pattern_for(paths, config.get("rank_pattern") or {}, config["r"]),
                        "alpha_pattern": _pattern_for(paths, config.get("alpha_pattern") or {}, config["lora_alpha"])}
    elif kind == "IA3":
        _refuse(config, modules_to_save=(None, []))
        paths = _peft_targets(backbone_model, config.get("target_modules"), ("Linear", "Conv1D"))
        feedforward = _peft_targets(backbone_model, config.get("feedforward_modules"), ("Linear", "Conv1D")) \
            if config.get("feedforward_modules") else []
        delta_config = {"delta_type": "ia3", "modified_modules": compile_selection(tree, paths),
                        "feedforward_modules": compile_selection(tree, feedforward) if feedforward else []}
        tensors = {k: v.reshape(-1) for k, v in tensors.items()}
    elif kind == "PROMPT_TUNING":
        _refuse(config, num_transformer_submodules=(1, None))
        prompt = tensors.get("prompt_embeddings")
        if prompt is None:
            raise CheckpointError(f"{WEIGHTS_FILE} has no prompt_embeddings")
        delta_config = {"delta_type": "soft_prompt", "soft_token_num": int(prompt.shape[0]), "token_init": False}
    else:
        raise ConfigError(f"PEFT adapters of type {kind!r} have no equivalent here; "
                          "supported: LORA, IA3, PROMPT_TUNING")
    delta = AutoDeltaModel.from_config(delta_config, backbone_model, attach=False)
    if kind == "PROMPT_TUNING":
        tensors = {f"{delta.modified_paths[0]}.soft_embeds": tensors["prompt_embeddings"]}
    delta.load_delta_state(tensors)
    delta.attach()
    set_trainable(delta, is_trainable)
    return delta
