"""PEFT's rules for which modules an adapter config selects, applied to a backbone here.

``adapter_config.json`` files name their modules with PEFT's own rules, not this library's grammar:
``target_modules`` as a list of suffixes or one full-match regex (or ``"all-linear"``, or null for
PEFT's per-architecture defaults), narrowed by ``layers_to_transform``/``layers_pattern`` and
``exclude_modules``; ``modules_to_save`` by plain name endings. These functions reproduce those
rules (PEFT's ``check_target_module_exists`` and ``_set_trainable``), so an imported adapter
wraps exactly the modules PEFT would, and an export can be checked by matching it back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from engine.errors import ConfigError
from engine.tree import all_modules

logger = logging.getLogger(__name__)

#: PEFT's classes of layers LoRA wraps; subclasses count (Falcon's FalconLinear, bitsandbytes' 4/8-bit)
_LAYER_CLASSES = (("Linear", nn.Linear), ("Embedding", nn.Embedding), ("Conv1d", nn.Conv1d),
                  ("Conv2d", nn.Conv2d), ("Conv3d", nn.Conv3d))
#: the layer kinds each PEFT method wraps
KINDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "LORA": ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d"), "IA3": ("Linear", "Conv1D")})


def layer_kind(module: nn.Module) -> str | None:
    """The PEFT layer kind of ``module`` — by ``isinstance``, so subclasses are their base — or
    None. transformers' ``Conv1D`` is not a torch class; its name identifies it."""
    if any(k.__name__ == "Conv1D" for k in type(module).__mro__):
        return "Conv1D"
    return next((name for name, cls in _LAYER_CLASSES if isinstance(module, cls)), None)


def _layer_index(path: str, patterns: Any) -> int | None:
    """The layer index PEFT reads from a module path: the first numbered segment (after one of
    ``layers_pattern`` when given)."""
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _excluded(path: str, exclude: Any, modules_to_save: Any) -> bool:
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                return True
        elif path in exclude or any(path.endswith(f".{e}") for e in exclude):
            return True
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def _hit(path: str, target: Any, layers: Any, patterns: Any) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    if path in target:
        return True
    if not any(path.endswith(f".{t}") for t in target):
        return False
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(path, patterns)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def all_linear_suffixes(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"``: the last name of every Linear/Conv1D layer but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {path.rsplit(".", 1)[-1] for path, module in all_modules(model).items()
             if path and module is not head and layer_kind(module) in ("Linear", "Conv1D")}
    return sorted(names)


def default_targets(model: nn.Module, peft_type: str) -> tuple[list[str], str]:
    """``target_modules: null``: PEFT's default targets for this architecture — from the mapping
    PEFT ships when it is installed, else this library's defaults — and which was used."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import constants
    except ImportError:
        constants = None
    table = {"LORA": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
             "IA3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"}[peft_type]
    mapping = getattr(constants, table, {}) if constants is not None else {}
    if model_type in mapping:
        return list(mapping[model_type]), f"PEFT's default target_modules for model type {model_type!r}"
    from engine.methods.ia3 import IA3Model
    from engine.methods.lora import LoraModel
    from engine.roles import ModelStructure, default_positions, expand_common_names

    method = LoraModel if peft_type == "LORA" else IA3Model
    structure = ModelStructure(model)
    expressions = expand_common_names(structure, default_positions(structure, method.default_modified_modules),
                                      typed=False)
    from engine.addressing import resolve

    paths = resolve(structure.tree, expressions).paths
    why = "PEFT is not installed" if constants is None else f"PEFT has no defaults for model type {model_type!r}"
    return paths, f"this library's default positions ({why})"


def peft_default_modules(model: nn.Module, peft_type: str = "LORA") -> tuple[list[str], str]:
    """The module paths an adapter with ``target_modules: null`` wraps on ``model`` (PEFT's
    defaults for its architecture), and where those defaults came from."""
    _, source = default_targets(model, peft_type)
    return target_paths(model, {"target_modules": None}, peft_type), source


def target_paths(model: nn.Module, config: dict[str, Any], peft_type: str,
                 field: str = "target_modules") -> list[str]:
    """The module paths PEFT would wrap for ``config[field]``; a matched module PEFT cannot wrap,
    or a selection that matches nothing, is an error naming it."""
    kinds = KINDS[peft_type]
    target = config.get(field)
    if target is None:
        target, source = default_targets(model, peft_type)
        logger.info("target_modules is null: using %s: %s", source, target)
    elif target == "all-linear":
        target = all_linear_suffixes(model)
    elif not isinstance(target, (str, list)) or (isinstance(target, list) and
                                                 not all(isinstance(t, str) for t in target)):
        raise ConfigError(f"PEFT {field} must be a list of names or a regex string, got {target!r}")
    layers, patterns = config.get("layers_to_transform"), config.get("layers_pattern")
    paths = []
    for path, module in all_modules(model).items():
        if not path or _excluded(path, config.get("exclude_modules"), config.get("modules_to_save")):
            continue
        if _hit(path, target, layers, patterns):
            if layer_kind(module) not in kinds:
                raise ConfigError(
                    f"the PEFT {field} {target!r} select {path!r}, a {type(module).__name__}, which PEFT "
                    f"cannot wrap either (it wraps {', '.join(kinds)} layers and their subclasses)")
            paths.append(path)
    if not paths:
        raise ConfigError(f"the PEFT {field} {target!r} match no layer of this backbone")
    return paths


def modules_to_save_paths(model: nn.Module, names: list[str] | None) -> list[str]:
    """The modules PEFT trains and saves whole for ``modules_to_save``: every module whose path
    ends with one of the names (PEFT's plain ``endswith``), outermost only. Names that match
    nothing are skipped, as PEFT skips them (its sequence-classification default lists both
    ``classifier`` and ``score``)."""
    found: list[str] = []
    for path in all_modules(model):
        if path and any(path.endswith(name) for name in names or ()) and not any(
                path.startswith(outer + ".") for outer in found):
            found.append(path)
    return found


def compact_targets(model: nn.Module, paths: list[str], peft_type: str) -> dict[str, Any]:
    """The shortest PEFT selection that matches exactly ``paths``: name suffixes, then suffixes
    narrowed by ``layers_to_transform``/``layers_pattern``; the full paths when neither fits.
    Each candidate is checked by matching it back with :func:`target_paths`."""
    wanted = list(paths)
    depth = max(p.count(".") + 1 for p in wanted)
    indices = [_layer_index(p, None) for p in wanted]
    stacks = {m.group(1) for p in wanted if (m := re.match(r".*?\.?([^.]*)\.\d+\.", p))}
    for size in range(1, depth + 1):
        suffixes = sorted({".".join(p.split(".")[-size:]) for p in wanted})
        candidates: list[dict[str, Any]] = [{"target_modules": suffixes}]
        if None not in indices and len(stacks) == 1:
            candidates.append({"target_modules": suffixes, "layers_to_transform": sorted(set(indices)),
                               "layers_pattern": next(iter(stacks))})
        for candidate in candidates:
            try:
                if target_paths(model, candidate, peft_type) == wanted:
                    return candidate
            except ConfigError:
                continue
    return {"target_modules": wanted}
