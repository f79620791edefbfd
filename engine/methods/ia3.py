"""IA3: learned vectors that rescale activations — the output of key/value projections, the input
of the feed-forward down-projection (Liu et al., 2022). Initialised to ones: attaching is a no-op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engine.addressing import resolve
from engine.config import DeltaConfig
from engine.delta import DeltaBase
from engine.layers import DeltaModule
from engine.registry import register
from engine.roles import ModelStructure, available_roles, expand_common_names
from engine.routing import RouteHandle, attach_route


@dataclass
class IA3Config(DeltaConfig):
    delta_type: ClassVar[str] = "ia3"
    routes: ClassVar[tuple[str, ...]] = ("scale",)

    feedforward_modules: list[str] | None = field(default=None, metadata={
        "help": "expressions for modules whose input (not output) is scaled; default ff.w2"})


class IA3Vector(DeltaModule):
    """The scaling vector ``ia3_l`` of one module, over its output or its input features."""

    def __init__(self, size: int, on_input: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.on_input = on_input

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ia3_l


@register
class IA3Model(DeltaBase):
    """Rescaling vectors on attention k/v outputs and feed-forward inputs."""

    config_class = IA3Config
    default_modified_modules: ClassVar[list[str]] = ["attn.k", "attn.v", "ff.w2"]
    supported_modules: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    @classmethod
    def feedforward_paths(cls, structure: ModelStructure, config: IA3Config) -> set[str]:
        """Modules whose input is scaled (the feed-forward down-projections)."""
        expressions = config.feedforward_modules
        if expressions is None:
            if "ff.w2" not in available_roles(structure):
                return set()
            return set(resolve(structure.tree, expand_common_names(structure, ["ff.w2"], typed=False)).paths)
        return set(resolve(structure.tree, expand_common_names(structure, list(expressions))).paths)

    @classmethod
    def variants(cls, structure: ModelStructure, config: DeltaConfig, paths: list[str]) -> dict[str, Any]:
        feedforward = cls.feedforward_paths(structure, config)  # type: ignore[arg-type]
        return {p: p in feedforward for p in paths}

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        feedforward = self.feedforward_paths(self.structure(), self.config)  # type: ignore[arg-type]
        sizes = self.module_sizes(modules)
        result: dict[str, DeltaModule] = {}
        for path, module in modules.items():
            device, dtype = self.placement(module)
            on_input = path in feedforward
            size = sizes[path].input_dim if on_input else sizes[path].output_dim
            result[path] = IA3Vector(size, on_input, device, dtype)
        return result


    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        route = "before" if delta.on_input else "after"  # type: ignore[union-attr]
        return attach_route(route, module, delta, mode="multiply", select=self.row_selector)
