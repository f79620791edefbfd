"""Adapter: a bottleneck MLP added after (or before, or in parallel with) a module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN

from engine.config import DeltaConfig, one_of, positive_int
from engine.delta import DeltaBase
from engine.layers import DeltaModule, new_linear, zero_init
from engine.registry import register
from engine.roles.kinds import IOSizes, is_channels_first

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
    """down → activation → up; ``up`` starts at zero so attaching changes nothing.

    The projections are given, so the adapter variants (low-rank, Compacter's hypercomplex
    layers) share this module and differ only in how they parameterise down and up.
    """

    def __init__(self, down: nn.Module, non_linearity: str, up: nn.Module) -> None:
        super().__init__()
        self.down = down
        self.activation = ACT2FN[non_linearity]
        self.up = up
        self.channels_first = False
        #: a factor on the output (ParallelAdapter's ``scaled``)
        self.scale = 1.0

    def along_features_of(self, module: nn.Module) -> AdapterLayer:
        """Run along the wrapped module's feature dimension: dimension 1 for a convolution."""
        self.channels_first = is_channels_first(module)
        return self

    @classmethod
    def linear(cls, in_dim: int, bottleneck: int, out_dim: int, non_linearity: str,
               device: torch.device, dtype: torch.dtype) -> AdapterLayer:
        """The plain adapter: two Linear layers."""
        return cls(new_linear(in_dim, bottleneck, True, device, dtype), non_linearity,
                   new_linear(bottleneck, out_dim, True, device, dtype, zero_init))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            output = self.up(self.activation(self.down(hidden.movedim(1, -1)))).movedim(-1, 1)
        else:
            output = self.up(self.activation(self.down(hidden)))
        return output if self.scale == 1.0 else output * self.scale


def route_dims(route: str | None, sizes: IOSizes) -> tuple[int, int]:
    """Input and output width of an adapter placed along ``route`` on a module of ``sizes``."""
    in_dim = sizes.output_dim if route == "after" else sizes.input_dim
    out_dim = sizes.input_dim if route == "before" else sizes.output_dim
    return in_dim, out_dim


@register
class AdapterModel(DeltaBase):
    """Houlsby-style adapters (sequential by default) on any module with a tensor output."""

    config_class = AdapterConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.o", "ff.w2"]

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> AdapterLayer:
        device, dtype = self.placement(module)
        in_dim, out_dim = route_dims(self.config.route, sizes)
        return AdapterLayer.linear(in_dim, self.config.bottleneck_dim, out_dim,  # type: ignore[attr-defined]
                                   self.config.non_linearity, device, dtype).along_features_of(module)  # type: ignore[attr-defined]
