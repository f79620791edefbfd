"""Delta Designer's engine: plug-and-play delta tuning for PyTorch.

The designer imports only the names listed in ``__all__``. Each name is imported from its module on
first use (PEP 562), so ``import engine`` costs next to nothing and a command loads only what it
needs: ``engine.LoraModel`` imports the LoRA method, not transformers' modeling code or the other
methods.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

#: public name → the module that defines it
_EXPORTS: MappingProxyType[str, str] = MappingProxyType({
    "CATALOG": "engine.catalog",
    "base_model_id": "engine.catalog",
    "COMMON_NAMES": "engine.roles",
    "REGISTRY": "engine.registry",
    "DeltaEstimate": "engine.estimate",
    "ModelStructure": "engine.roles",
    "Roles": "engine.roles",
    "infer_roles": "engine.roles",
    "atomic_write_bytes": "engine.checkpoint",
    "checkpoint_bytes": "engine.estimate",
    "estimate_delta": "engine.estimate",
    "expand_common_names": "engine.roles",
    "module_parameters": "engine.estimate",
    "export_peft": "engine.interop.peft",
    "import_peft": "engine.interop.peft",
    "peft_adapter_config": "engine.interop.peft",
    "peft_default_modules": "engine.interop.peft_matching",
    "ActivationTrace": "engine.memory_trace",
    "TrainingSetup": "engine.memory_plan",
    "WEIGHT_FORMATS": "engine.memory_plan",
    "computing_in": "engine.memory_trace",
    "max_positions": "engine.memory_trace",
    "plan_memory": "engine.memory_plan",
    "trace_activations": "engine.memory_trace",
    "weight_bytes": "engine.memory_plan",
    "AdapterConfig": "engine.methods.adapter",
    "AdapterModel": "engine.methods.adapter",
    "AppliedDesign": "engine.design",
    "AutoDeltaConfig": "engine.auto",
    "AutoDeltaModel": "engine.auto",
    "BitFitConfig": "engine.methods.bitfit",
    "BitFitModel": "engine.methods.bitfit",
    "CompacterConfig": "engine.methods.compacter",
    "CompacterModel": "engine.methods.compacter",
    "IA3Config": "engine.methods.ia3",
    "IA3Model": "engine.methods.ia3",
    "LowRankAdapterConfig": "engine.methods.low_rank_adapter",
    "LowRankAdapterModel": "engine.methods.low_rank_adapter",
    "ParallelAdapterConfig": "engine.methods.parallel_adapter",
    "ParallelAdapterModel": "engine.methods.parallel_adapter",
    "SoftPromptConfig": "engine.methods.soft_prompt",
    "SoftPromptModel": "engine.methods.soft_prompt",
    "DeltaBase": "engine.delta",
    "DeltaConfig": "engine.config",
    "DeltaModule": "engine.layers",
    "Design": "engine.design",
    "DesignMismatchError": "engine.design",
    "LoraConfig": "engine.methods.lora",
    "LoraModel": "engine.methods.lora",
    "PrefixConfig": "engine.methods.prefix",
    "PrefixModel": "engine.methods.prefix",
    "Route": "engine.routing",
    "attach_route": "engine.routing",
    "tasks": "engine.mixed_batches",
    "method_for": "engine.registry",
    "register": "engine.registry",
    "registered_methods": "engine.registry",
    "DEFAULT_SOURCE": "engine.backbones",
    "AddressingError": "engine.errors",
    "Backbone": "engine.backbones",
    "BackboneError": "engine.errors",
    "BackboneNotFoundError": "engine.errors",
    "CatalogEntry": "engine.catalog",
    "CheckpointError": "engine.errors",
    "ConfigError": "engine.errors",
    "DeltaError": "engine.errors",
    "DeltaStateError": "engine.errors",
    "InvalidExpressionError": "engine.errors",
    "MatchReport": "engine.addressing",
    "ModuleNotSupportedError": "engine.errors",
    "ModuleTree": "engine.tree",
    "NoMatchError": "engine.errors",
    "PickleRefusedError": "engine.errors",
    "TreeNode": "engine.tree",
    "UnknownBackboneError": "engine.errors",
    "UnknownPathError": "engine.errors",
    "Visualization": "engine.visualize",
    "inspect_module_statistics": "engine.statistics",
    "inspect_optimizer_statistics": "engine.statistics",
    "build_on_meta": "engine.backbones",
    "compile_selection": "engine.addressing",
    "format_indices": "engine.tree",
    "human_count": "engine.visualize",
    "list_architectures": "engine.backbones",
    "load_backbone": "engine.backbones",
    "parse_expression": "engine.addressing",
    "parse_indices": "engine.tree",
    "resolve": "engine.addressing",
})

__all__ = tuple(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from engine.addressing import (  # noqa: F401
        MatchReport,
        compile_selection,
        parse_expression,
        resolve,
    )
    from engine.auto import AutoDeltaConfig, AutoDeltaModel  # noqa: F401
    from engine.backbones import (  # noqa: F401
        DEFAULT_SOURCE,
        Backbone,
        build_on_meta,
        list_architectures,
        load_backbone,
    )
    from engine.catalog import CATALOG, CatalogEntry, base_model_id  # noqa: F401
    from engine.checkpoint import atomic_write_bytes  # noqa: F401
    from engine.config import DeltaConfig  # noqa: F401
    from engine.delta import DeltaBase  # noqa: F401
    from engine.design import AppliedDesign, Design, DesignMismatchError  # noqa: F401
    from engine.errors import (  # noqa: F401
        AddressingError,
        BackboneError,
        BackboneNotFoundError,
        CheckpointError,
        ConfigError,
        DeltaError,
        DeltaStateError,
        InvalidExpressionError,
        ModuleNotSupportedError,
        NoMatchError,
        PickleRefusedError,
        UnknownBackboneError,
        UnknownPathError,
    )
    from engine.estimate import (  # noqa: F401
        DeltaEstimate,
        checkpoint_bytes,
        estimate_delta,
        module_parameters,
    )
    from engine.interop.peft import export_peft, import_peft, peft_adapter_config  # noqa: F401
    from engine.interop.peft_matching import peft_default_modules  # noqa: F401
    from engine.layers import DeltaModule  # noqa: F401
    from engine.memory_plan import (  # noqa: F401
        WEIGHT_FORMATS,
        TrainingSetup,
        plan_memory,
        weight_bytes,
    )
    from engine.memory_trace import (  # noqa: F401
        ActivationTrace,
        computing_in,
        max_positions,
        trace_activations,
    )
    from engine.methods.adapter import AdapterConfig, AdapterModel  # noqa: F401
    from engine.methods.bitfit import BitFitConfig, BitFitModel  # noqa: F401
    from engine.methods.compacter import CompacterConfig, CompacterModel  # noqa: F401
    from engine.methods.ia3 import IA3Config, IA3Model  # noqa: F401
    from engine.methods.lora import LoraConfig, LoraModel  # noqa: F401
    from engine.methods.low_rank_adapter import (  # noqa: F401
        LowRankAdapterConfig,
        LowRankAdapterModel,
    )
    from engine.methods.parallel_adapter import (  # noqa: F401
        ParallelAdapterConfig,
        ParallelAdapterModel,
    )
    from engine.methods.prefix import PrefixConfig, PrefixModel  # noqa: F401
    from engine.methods.soft_prompt import SoftPromptConfig, SoftPromptModel  # noqa: F401
    from engine.mixed_batches import tasks  # noqa: F401
    from engine.registry import REGISTRY, method_for, register, registered_methods  # noqa: F401
    from engine.roles import (  # noqa: F401
        COMMON_NAMES,
        ModelStructure,
        Roles,
        expand_common_names,
        infer_roles,
    )
    from engine.routing import Route, attach_route  # noqa: F401
    from engine.statistics import (  # noqa: F401
        inspect_module_statistics,
        inspect_optimizer_statistics,
    )
    from engine.tree import ModuleTree, TreeNode, format_indices, parse_indices  # noqa: F401
    from engine.visualize import Visualization, human_count  # noqa: F401
