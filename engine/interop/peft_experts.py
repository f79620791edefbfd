"""LoRA on fused mixture-of-experts parameters in PEFT's ``target_parameters`` layout (PEFT ≥ 0.17).

transformers 5 keeps a layer's experts as 3-D parameters (experts, d1, d2). Here each expert gets
its own factors, ``lora_B[e] @ lora_A[e]`` of shape (d1, d2). PEFT stacks them into two Linear
weights — ``lora_A`` (experts·r, d2), ``lora_B`` (d1, r·experts), the expert index varying slowest
in A's rows and fastest in B's columns — and nests one wrapper per parameter on the module, the
module's first parameter innermost (its keys carry one ``base_layer.`` per wrapper around it).
Layers that keep their experts transposed (``is_transposed``) use another layout and are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.errors import CheckpointError, ConfigError
from engine.roles.kinds import fused_expert_parameters


def _names(module: nn.Module, path: str) -> list[str]:
    if getattr(module, "is_transposed", False):
        raise ConfigError(f"{path!r} keeps its experts transposed (is_transposed): PEFT's target_parameters "
                          "layout for it is not supported here")
    return fused_expert_parameters(module)


def _key(path: str, names: list[str], name: str, factor: str) -> str:
    return f"{path}.{'base_layer.' * (len(names) - 1 - names.index(name))}lora_{factor}.weight"


def target_parameters(modules: dict[str, nn.Module], paths: list[str]) -> list[str]:
    """PEFT's ``target_parameters`` for LoRA on the experts modules at ``paths``."""
    return [f"{path}.{name}" for path in paths for name in _names(modules[path], path)]


def experts_to_peft(modules: dict[str, nn.Module], paths: list[str],
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-expert factors (``{path}.lora_A.{name}``: experts × r × d2, ``lora_B``: experts ×
    d1 × r) as PEFT's stacked Linear weights, by PEFT's keys (without its prefix)."""
    tensors = {}
    for path in paths:
        names = _names(modules[path], path)
        for name in names:
            factor_a, factor_b = state[f"{path}.lora_A.{name}"], state[f"{path}.lora_B.{name}"]
            experts, rank, columns = factor_a.shape
            tensors[_key(path, names, name, "A")] = factor_a.reshape(experts * rank, columns)
            tensors[_key(path, names, name, "B")] = factor_b.permute(1, 2, 0).reshape(factor_b.shape[1], -1)
    return tensors


def experts_paths_from_peft(model_modules: dict[str, nn.Module], targets: Any) -> list[str]:
    """The experts modules an adapter's ``target_parameters`` name (PEFT's suffix rule); each must
    name every fused parameter of its module, since a delta here adapts all of them."""
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"PEFT target_parameters must be a list of names, got {targets!r}")
    chosen: dict[str, set[str]] = {}
    for path, module in model_modules.items():
        for name in fused_expert_parameters(module):
            key = f"{path}.{name}"
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                chosen.setdefault(path, set()).add(name)
    if not chosen:
        raise ConfigError(f"the PEFT target_parameters {targets!r} match no fused experts parameter of this backbone")
    for path, names in chosen.items():
        missing = [n for n in _names(model_modules[path], path) if n not in names]
        if missing:
            raise ConfigError(f"the PEFT target_parameters adapt only some of {path!r}'s experts parameters "
                              f"(not {', '.join(missing)}); a delta here adapts all of them")
    return list(chosen)


def experts_from_peft(model_modules: dict[str, nn.Module], paths: list[str],
                      tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's stacked weights back to our per-expert factors (popped from ``tensors``)."""
    state = {}
    for path in paths:
        names = _names(model_modules[path], path)
        for name in names:
            experts = getattr(model_modules[path], name).shape[0]
            try:
                stacked_a, stacked_b = tensors.pop(_key(path, names, name, "A")), tensors.pop(_key(path, names, name, "B"))
            except KeyError as error:
                raise CheckpointError(f"the adapter has no LoRA factors for {path}.{name} ({error})") from None
            rank = stacked_a.shape[0] // experts
            state[f"{path}.lora_A.{name}"] = stacked_a.reshape(experts, rank, stacked_a.shape[1])
            state[f"{path}.lora_B.{name}"] = stacked_b.reshape(stacked_b.shape[0], rank, experts).permute(2, 0, 1)
    return state
