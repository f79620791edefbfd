"""Deltas to and from PEFT's adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.<tensor>``.

LoRA (with rsLoRA, DoRA and per-module ranks/alphas), IA3, prefix tuning and soft prompts
(prompt tuning) move both ways, with ``modules_to_save`` (whole modules trained beside the adapter: a delta's
unfrozen modules here). An export names its modules compactly (suffixes, narrowed by
``layers_to_transform`` where that is exact) and is matched back to check it; an import applies
PEFT's own matching rules (``engine.interop.peft_matching``). What PEFT cannot express — or what
this library cannot — is refused with the option named, before any tensor is read
(``engine.interop.peft_options``).
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
    BACKBONE_PREFIX,
    listing,
    read_safetensors,
    recover,
    safetensors_data,
    write_files_together,
)
from engine.delta import DeltaBase
from engine.errors import CheckpointError, ConfigError
from engine.interop.peft_experts import (
    experts_from_peft,
    experts_paths_from_peft,
    experts_to_peft,
    target_parameters,
)
from engine.interop.peft_matching import (
    compact_targets,
    modules_to_save_paths,
    target_paths,
)
from engine.interop.peft_options import refuse_unsupported
from engine.interop.peft_prefix import (
    prefix_adapter_config,
    prefix_config_from_peft,
    prefix_state_from_peft,
    prefix_tensors,
)
from engine.persistence import set_trainable, unfrozen_tensors
from engine.roles import ModelStructure
from engine.roles.kinds import is_fused_experts
from engine.tree import ModuleTree, all_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --- export ------------------------------------------------------------------------------------


def peft_adapter_config(
    delta: DeltaBase, base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT needs for ``delta``; refused (naming why) otherwise.

    ``modules_to_save`` defaults to the delta's unfrozen backbone modules (their tensors travel in
    the adapter file); ``base_model_name_or_path`` to the backbone config's ``_name_or_path``.
    """
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(delta.backbone_model, "config", None), "_name_or_path", None) or None
    saved = _modules_to_save(delta, modules_to_save)
    kind = delta.delta_type
    if kind == "lora":
        return _lora_config(delta, base_model_name_or_path, saved)
    if kind == "ia3":
        return {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
                **_ia3_targets(delta), "fan_in_fan_out": _fan_in_fan_out(delta),
                "modules_to_save": saved, "init_ia3_weights": True, "inference_mode": False}
    if kind == "prefix":
        return prefix_adapter_config(delta, base_model_name_or_path, saved)
    if kind == "soft_prompt":
        config = getattr(delta.backbone_model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError("soft prompts on encoder-decoder models are not exported: PEFT's prompt "
                              "tuning also prompts the decoder there, this library only the encoder")
        task = "CAUSAL_LM" if hasattr(delta.backbone_model, "generate") and getattr(
            delta.backbone_model, "can_generate", lambda: False)() else "FEATURE_EXTRACTION"
        soft = next(iter(delta.delta_modules.values())).soft_embeds
        return {"peft_type": "PROMPT_TUNING", "task_type": task,
                "base_model_name_or_path": base_model_name_or_path, "modules_to_save": saved,
                "num_virtual_tokens": soft.shape[0], "token_dim": soft.shape[1],
                "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "inference_mode": False}
    raise ConfigError(
        f"PEFT export supports lora, ia3, prefix and soft_prompt deltas; {kind} has no PEFT equivalent "
        "with the same behaviour (save it with save_finetuned instead)"
    )


def _modules_to_save(delta: DeltaBase, given: list[str] | None) -> list[str] | None:
    """PEFT's ``modules_to_save`` for the delta's unfrozen modules (or ``given`` expressions):
    full paths, each of which PEFT's name-ending rule must match alone, none holding a wrapped
    layer, none sharing a weight with another module (PEFT would train an untied copy)."""
    model = delta.backbone_model
    if given is None:
        paths = list(delta.unfrozen_paths)
    else:
        from engine.addressing import resolve
        from engine.roles import expand_common_names

        structure = ModelStructure(model)
        paths = resolve(structure.tree, expand_common_names(structure, list(given))).paths if given else []
    if not paths:
        return None
    everything = [p for p in all_modules(model) if p]
    for path in paths:
        matched = [p for p in everything if p.endswith(path)]
        if matched != [path] and not all(p == path or p.startswith(path + ".") for p in matched):
            raise ConfigError(f"unfrozen module {path!r} cannot be named in PEFT's modules_to_save: PEFT "
                              f"matches names by their ending and would also train {listing(matched)}")
        inside = [t for t in delta.modified_paths if t == path or t.startswith(path + ".")]
        if inside:
            raise ConfigError(f"unfrozen module {path!r} holds adapted layers ({listing(inside)}): PEFT never "
                              "adapts a layer inside modules_to_save")
    _refuse_tied(model, paths)
    return paths


def _refuse_tied(model: nn.Module, paths: list[str]) -> None:
    """A module PEFT saves whole must not share a weight with a module outside it: PEFT trains a
    copy (untying them), this library the shared tensor (changing both)."""
    owners: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), set()).add(name.rsplit(".", 1)[0])
    for path in paths:
        for parameter in all_modules(model)[path].parameters():
            outside = sorted(o for o in owners.get(id(parameter), ()) if o != path and not o.startswith(path + "."))
            if outside:
                raise ConfigError(
                    f"modules_to_save {path!r} shares its weight with {listing(outside)} (tied embeddings): PEFT "
                    "trains an untied copy, this library the shared tensor, so the two would differ; untie "
                    "the weights first (model.config.tie_word_embeddings=False before loading) or list both")


def _ia3_targets(delta: DeltaBase) -> dict[str, Any]:
    """IA3's targets and feed-forward modules: PEFT wants the latter to be a subset of the former's
    entries, so the compact form is used only where whole entries are feed-forward ones."""
    model, paths = delta.backbone_model, delta.modified_paths
    feedforward = [p for p in paths if delta.delta_modules[p.replace(".", "/")].on_input]
    compact = compact_targets(model, paths, "IA3")
    if "layers_to_transform" not in compact:
        entries = [e for e in compact["target_modules"] if set(target_paths(
            model, {"target_modules": [e]}, "IA3")) & set(paths) <= set(feedforward)]
        if entries and target_paths(model, {**compact, "target_modules": entries}, "IA3") == feedforward:
            return {**compact, "feedforward_modules": entries}
        if not feedforward:
            return {**compact, "feedforward_modules": []}
    return {"target_modules": list(paths), "feedforward_modules": feedforward}


def _fan_in_fan_out(delta: DeltaBase) -> bool:
    modules = all_modules(delta.backbone_model)
    kinds = {type(modules[p]).__name__ for p in delta.modified_paths}
    if "Conv1D" in kinds and len(kinds) > 1:
        raise ConfigError(f"PEFT needs one fan_in_fan_out setting per adapter; this one wraps {', '.join(sorted(kinds))}")
    return kinds == {"Conv1D"}


def _experts(delta: DeltaBase) -> list[str]:
    modules = all_modules(delta.backbone_model)
    return [p for p in delta.modified_paths if is_fused_experts(modules[p])]


def _lora_config(delta: DeltaBase, base: str | None, saved: list[str] | None) -> dict[str, Any]:
    model = delta.backbone_model
    experts = _experts(delta)
    linear = [p for p in delta.modified_paths if p not in experts]
    config: Any = delta.config
    settings = delta.variants(ModelStructure(model), config, delta.modified_paths)
    odd = [p for p in experts if settings[p] != (config.lora_r, config.lora_alpha)]
    if odd:
        raise ConfigError(f"per-module ranks or alphas on fused experts ({odd[0]!r}) are not exported: PEFT's "
                          "target_parameters take the adapter's r and lora_alpha")
    rank_pattern = {re.escape(p): settings[p][0] for p in linear if settings[p][0] != config.lora_r}
    alpha_pattern = {re.escape(p): settings[p][1] for p in linear if settings[p][1] != config.lora_alpha}
    targets = compact_targets(model, linear, "LORA") if linear else {"target_modules": []}
    if experts:
        targets["target_parameters"] = target_parameters(all_modules(model), experts)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
        "r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        **targets, "fan_in_fan_out": _fan_in_fan_out(delta) if linear else False,
        "bias": "none", "modules_to_save": saved, "init_lora_weights": True,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": False,
    }


def _peft_tensors(delta: DeltaBase, saved: list[str] | None = None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    if delta.delta_type == "soft_prompt":
        tensors["prompt_embeddings"] = next(iter(delta.delta_modules.values())).soft_embeds.detach()
    elif delta.delta_type == "prefix":
        tensors.update(prefix_tensors(delta))
    else:
        state = delta.delta_state()
        experts = _experts(delta) if delta.delta_type == "lora" else []
        if experts:
            stacked = experts_to_peft(all_modules(delta.backbone_model), experts, state)
            tensors.update({PREFIX + k: v.detach() for k, v in stacked.items()})
            state = {k: v for k, v in state.items() if k.rsplit(".", 2)[0] not in experts}
        for key, tensor in state.items():
            if delta.delta_type == "ia3":
                path = key.rsplit(".", 1)[0]
                on_input = delta.delta_modules[path.replace(".", "/")].on_input
                tensor = tensor.reshape(1, -1) if on_input else tensor.reshape(-1, 1)
            tensors[PREFIX + key] = tensor.detach()
    if saved:
        modules = all_modules(delta.backbone_model)
        for path in saved:
            for name, tensor in modules[path].state_dict(keep_vars=True).items():
                if not any(f".{d}." in f".{name}" for d in _delta_names(delta.backbone_model)):
                    tensors[f"{PREFIX}{path}.{name}"] = tensor.detach()
    return tensors


def _delta_names(model: nn.Module) -> set[str]:
    return {name for module in model.modules() for name, child in module._modules.items()
            if getattr(child, "is_delta_module", False)}


def export_peft(delta: DeltaBase, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``delta`` in PEFT's layout so ``PeftModel.from_pretrained`` loads it."""
    config = peft_adapter_config(delta, base_model_name_or_path)
    tensors = _peft_tensors(delta, config.get("modules_to_save"))
    if any(t.is_meta for t in tensors.values()):
        raise ConfigError("this delta lives on a meta backbone and has no values to export")
    return write_files_together(Path(directory), {
        WEIGHTS_FILE: safetensors_data(tensors, {"format": "pt"}),
        CONFIG_FILE: json.dumps(config, indent=2, allow_nan=False).encode()})


# --- import ------------------------------------------------------------------------------------


def _pattern_for(paths: list[str], pattern: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT's ``(.*\\.)?(key)$`` pattern rule applied per path → explicit per-path patterns."""
    result = {}
    for path in paths:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)
        if key is not None and pattern[key] != default:
            result["[r]" + re.escape(path)] = pattern[key]
    return result


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}: not a PEFT adapter directory") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{CONFIG_FILE} in {str(directory)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{CONFIG_FILE} in {str(directory)!r} is not a JSON object")
    return config


def _delta_config(kind: str, config: dict[str, Any], model: nn.Module, tree: ModuleTree) -> dict[str, Any]:
    """This library's delta config for a PEFT adapter config (no tensor read yet)."""
    if kind == "LORA":
        paths = [] if config.get("target_parameters") and not config.get("target_modules") else \
            target_paths(model, config, "LORA")
        if config.get("target_parameters"):
            order = tree.order()
            paths = sorted(paths + experts_paths_from_peft(all_modules(model), config["target_parameters"]),
                           key=order.__getitem__)
        return {"delta_type": "lora", "modified_modules": compile_selection(tree, paths),
                "lora_r": config["r"], "lora_alpha": config["lora_alpha"],
                "lora_dropout": config.get("lora_dropout", 0.0),
                "use_rslora": bool(config.get("use_rslora")), "use_dora": bool(config.get("use_dora")),
                "rank_pattern": _pattern_for(paths, config.get("rank_pattern") or {}, config["r"]),
                "alpha_pattern": _pattern_for(paths, config.get("alpha_pattern") or {}, config["lora_alpha"])}
    if kind == "IA3":
        paths = target_paths(model, config, "IA3")
        feedforward = target_paths(model, config, "IA3", "feedforward_modules") \
            if config.get("feedforward_modules") else []
        return {"delta_type": "ia3", "modified_modules": compile_selection(tree, paths),
                "feedforward_modules": compile_selection(tree, feedforward) if feedforward else []}
    if kind == "PREFIX_TUNING":
        return prefix_config_from_peft(config)
    return {"delta_type": "soft_prompt", "soft_token_num": int(config["num_virtual_tokens"]), "token_init": False}


def import_peft(directory: str | Path, backbone_model: nn.Module, *, is_trainable: bool = False) -> DeltaBase:
    """Load a PEFT adapter directory as a delta on ``backbone_model`` (same outputs as PEFT).

    Its ``modules_to_save`` become the delta's unfrozen modules, their saved tensors loaded into
    the backbone. As PEFT's ``is_trainable=False``: for inference the model is put in ``eval()``
    and nothing requires grad; ``is_trainable=True`` freezes the backbone but for the delta and
    those modules.
    """
    from engine.auto import AutoDeltaModel

    directory = Path(directory)
    recover(directory)
    config = _read_config(directory)
    kind = config.get("peft_type")
    refuse_unsupported(config, str(kind))
    if kind == "PROMPT_TUNING" and not isinstance(config.get("num_virtual_tokens"), int):
        raise CheckpointError(f"{CONFIG_FILE} has no num_virtual_tokens")
    tree = ModuleTree.from_model(backbone_model)
    saved_paths = modules_to_save_paths(backbone_model, config.get("modules_to_save"))
    _refuse_tied(backbone_model, saved_paths)
    delta_config = _delta_config(str(kind), config, backbone_model, tree)
    if saved_paths:
        delta_config["unfrozen_modules"] = ["deltas", *compile_selection(tree, saved_paths)]
    raw = read_safetensors(directory / WEIGHTS_FILE)  # only now: the config is one we can reproduce
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    expert_paths = experts_paths_from_peft(all_modules(backbone_model), config["target_parameters"]) \
        if kind == "LORA" and config.get("target_parameters") else []
    expert_state = experts_from_peft(all_modules(backbone_model), expert_paths, tensors)
    tensors = {k: v for k, v in tensors.items() if ".base_layer." not in k}  # PEFT's copies of wrapped weights
    tensors.update(expert_state)
    backbone_keys = [k for k in tensors if any(k.startswith(p + ".") for p in saved_paths)]
    tensors.update({BACKBONE_PREFIX + k: tensors.pop(k) for k in backbone_keys})
    delta = AutoDeltaModel.from_config(delta_config, backbone_model, attach=False)
    delta.unfrozen_paths = saved_paths
    if kind == "PROMPT_TUNING":
        if "prompt_embeddings" not in tensors:
            raise CheckpointError(f"{WEIGHTS_FILE} has no prompt_embeddings")
        tensors[f"{delta.modified_paths[0]}.soft_embeds"] = tensors.pop("prompt_embeddings")
    if kind == "IA3":
        tensors = {k: v if k.startswith(BACKBONE_PREFIX) else v.reshape(-1) for k, v in tensors.items()}
    if kind == "PREFIX_TUNING":
        tensors.update(prefix_state_from_peft(delta, config, tensors))
    expected_backbone = {k.removeprefix(BACKBONE_PREFIX) for k in unfrozen_tensors(delta, trainable_only=False)}
    missing = sorted(expected_backbone - {k.removeprefix(BACKBONE_PREFIX) for k in tensors})
    if missing:
        raise CheckpointError(f"the adapter's modules_to_save miss trained tensors: {listing(missing)}")
    delta.load_delta_state(tensors)
    delta.attach()
    set_trainable(delta, is_trainable)
    return delta
