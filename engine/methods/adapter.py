"""Adapter: a bottleneck MLP added after (or before, or in parallel with) a module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

from engine.config import DeltaConfig, one_of, positive_int
from engine.delta import DeltaBase, DeltaModule, new_linear, zero_init
from engine.methods import register
from engine.sizing import IOSizes, module_device_dtype

ACTIVATIONS = tuple(sorted(ACT2FN))


@dataclass
class AdapterConfig(DeltaConfig):
    delta_type: ClassVar[str] = "adapter"
    routes: ClassVar[tuple[str, ...]] = ("after", "before", "parallel")

    bottleneck_dim: int = field(default=24, metadata={"help": "width of the bottleneck"})
    non_linearity: str = field(
        default="gelu_new", metadata={"help": "activation between down and up", "choices": ACTIVATIONS}
    )

    def validate(self) -> None:
        positive_int("adapter", "bottleneck_dim", self.bottleneck_dim)
        one_of("adapter", "non_linearity", self.non_linearity, ACTIVATIONS)


class AdapterLayer(DeltaModule):
    """down → activation → up, with ``up`` zero-initialised so attaching changes nothing."""

    def __init__(
        self, in_dim: int, out_dim: int, config: AdapterConfig, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.down = new_linear(in_dim, config.bottleneck_dim, True, device, dtype)
        self.activation = ACT2FN[config.non_linearity]
        self.up = new_linear(config.bottleneck_dim, out_dim, True, device, dtype, zero_init)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(hidden)))


@register
class AdapterModel(DeltaBase):
    """Houlsby-style adapters (sequential by default) on any module with a tensor output."""

    config_class = AdapterConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.o", "ff.w2"]

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> AdapterLayer:
        device, dtype = module_device_dtype(module, self.backbone_model)
        route = self.config.route
        in_dim = sizes.output_dim if route == "after" else sizes.input_dim
        out_dim = sizes.input_dim if route == "before" else sizes.output_dim
        return AdapterLayer(in_dim, out_dim, self.config, device, dtype)  # type: ignore[arg-type]
