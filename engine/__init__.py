"""Delta Designer's engine: plug-and-play delta tuning for PyTorch.

The designer imports only the names listed in ``__all__``.
"""

from engine.addressing import MatchReport, compile_selection, parse_expression, resolve
from engine.backbones import (
    DEFAULT_SOURCE,
    Backbone,
    build_on_meta,
    list_architectures,
    load_backbone,
)
from engine.catalog import CATALOG, CatalogEntry
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
from engine.tree import ModuleTree, TreeNode, format_indices, parse_indices
from engine.visualize import Visualization, human_count

__all__ = [
    "CATALOG",
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
