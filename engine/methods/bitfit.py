"""BitFit: train only biases. Each selected layer gets an additive, zero-initialised bias delta.

Adding ``b_delta`` after a layer with bias ``b`` is the same function and the same gradient as
training ``b`` itself, but the backbone's tensors stay untouched, so the delta can be detached,
saved on its own, and layers without a bias (LLaMA's) get one. Selecting a container (an
attention block, an FFN) applies BitFit to every Linear/Conv1D/convolution/norm layer inside it;
a mixture of fused experts gets one bias on its output (the mixture's, shared by the experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig
from engine.delta import DeltaBase
from engine.layers import DeltaModule
from engine.registry import register
from engine.roles.kinds import (
    IOSizes,
    declared_sizes,
    is_channels_first,
    is_fused_experts,
)
from engine.targets import descend_to


@dataclass
class BitFitConfig(DeltaConfig):
    delta_type: ClassVar[str] = "bitfit"
    routes: ClassVar[tuple[str, ...]] = ("after",)


class BiasLayer(DeltaModule):
    def __init__(self, dim: int, channels_first: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.channels_first = channels_first

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # a convolution's output is (batch, channels, *positions): the bias runs along dimension 1
        return self.bias.view(-1, *[1] * (hidden.dim() - 2)) if self.channels_first else self.bias


def takes_bias(module: nn.Module) -> bool:
    """Layers whose output has a feature dimension a bias can be added to."""
    return is_fused_experts(module) or (not isinstance(module, nn.Embedding) and declared_sizes(module) is not None)


@register
class BitFitModel(DeltaBase):
    """Bias-only tuning (Ben Zaken et al., 2021)."""

    config_class = BitFitConfig
    default_modified_modules: ClassVar[list[str]] = ["attn", "ff", "layer_norm"]

    @classmethod
    def select_targets(cls, paths: list[str], modules: dict[str, nn.Module]) -> list[str]:
        return descend_to("bitfit", paths, modules, takes_bias,
                          "Linear, Conv1D, convolution, norm or fused-expert layers that can take a bias")

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> BiasLayer:
        device, dtype = self.placement(module)
        return BiasLayer(sizes.output_dim, is_channels_first(module), device, dtype)
