"""Delta Designer's engine: plug-and-play delta tuning for PyTorch.

The designer imports only the names listed in ``__all__``.
"""

from engine.addressing import MatchReport, compile_selection, parse_expression, resolve
from engine.auto import AutoDeltaConfig, AutoDeltaModel
from engine.backbones import (
    DEFAULT_SOURCE,
    Backbone,
    build_on_meta,
    list_architectures,
    load_backbone,
)
from engine.catalog import CATALOG, CatalogEntry
from engine.checkpoint import atomic_write_bytes
from engine.config import DeltaConfig
from engine.delta import DeltaBase
from engine.design import AppliedDesign, Design, DesignMismatchError
from engine.errors import (
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
from engine.estimate import (
    DTYPE_BYTES,
    DeltaEstimate,
    checkpoint_bytes,
    estimate_delta,
    module_parameters,
    training_memory,
)
from engine.interop.peft import export_peft, import_peft, peft_adapter_config
from engine.layers import DeltaModule
from engine.methods.adapter import AdapterConfig, AdapterModel
from engine.methods.bitfit import BitFitConfig, BitFitModel
from engine.methods.compacter import CompacterConfig, CompacterModel
from engine.methods.ia3 import IA3Config, IA3Model
from engine.methods.lora import LoraConfig, LoraModel
from engine.methods.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from engine.methods.parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from engine.methods.prefix import PrefixConfig, PrefixModel
from engine.methods.soft_prompt import SoftPromptConfig, SoftPromptModel
from engine.registry import REGISTRY, method_for, register, registered_methods
from engine.roles import (
    COMMON_NAMES,
    ModelStructure,
    Roles,
    expand_common_names,
    infer_roles,
)
from engine.routing import Route, attach_route
from engine.tasks import tasks
from engine.tree import ModuleTree, TreeNode, format_indices, parse_indices
from engine.visualize import Visualization, human_count

__all__ = [
    "CATALOG",
    "COMMON_NAMES",
    "DTYPE_BYTES",
    "REGISTRY",
    "DeltaEstimate",
    "ModelStructure",
    "Roles",
    "infer_roles",
    "atomic_write_bytes",
    "checkpoint_bytes",
    "estimate_delta",
    "expand_common_names",
    "module_parameters",
    "export_peft",
    "import_peft",
    "peft_adapter_config",
    "training_memory",
    "AdapterConfig",
    "AdapterModel",
    "AppliedDesign",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "IA3Config",
    "IA3Model",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "DeltaBase",
    "DeltaConfig",
    "DeltaModule",
    "Design",
    "DesignMismatchError",
    "LoraConfig",
    "LoraModel",
    "PrefixConfig",
    "PrefixModel",
    "Route",
    "attach_route",
    "tasks",
    "method_for",
    "register",
    "registered_methods",
    "DEFAULT_SOURCE",
    "AddressingError",
    "Backbone",
    "BackboneError",
    "BackboneNotFoundError",
    "CatalogEntry",
    "CheckpointError",
    "ConfigError",
    "DeltaError",
    "DeltaStateError",
    "InvalidExpressionError",
    "MatchReport",
    "ModuleNotSupportedError",
    "ModuleTree",
    "NoMatchError",
    "PickleRefusedError",
    "TreeNode",
    "UnknownBackboneError",
    "UnknownPathError",
    "Visualization",
    "build_on_meta",
    "compile_selection",
    "format_indices",
    "human_count",
    "list_architectures",
    "load_backbone",
    "parse_expression",
    "parse_indices",
    "resolve",
]
