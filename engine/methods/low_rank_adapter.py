"""Low-rank adapters (Mahabadi et al., 2021): an adapter whose down and up projections are each a
product of two thin matrices of rank ``low_rank_rank``; the bottleneck is width / reduction_factor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig, one_of, positive_int
from engine.delta import DeltaBase
from engine.layers import DeltaModule
from engine.methods.adapter import ACTIVATIONS, AdapterLayer, route_dims
from engine.registry import register
from engine.roles.kinds import IOSizes

W_INITS = ("glorot-uniform", "glorot-normal")


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    delta_type: ClassVar[str] = "low_rank_adapter"
    routes: ClassVar[tuple[str, ...]] = ("after", "before", "parallel")

    reduction_factor: int = field(default=32, metadata={"help": "bottleneck = width / reduction_factor"})
    low_rank_rank: int = field(default=1, metadata={"help": "rank of each projection"})
    non_linearity: str = field(default="gelu_new", metadata={
        "help": "activation between down and up", "choices": ACTIVATIONS})
    low_rank_w_init: str = field(default="glorot-uniform", metadata={
        "help": "initialisation of the factors (OpenDelta's)", "choices": W_INITS})

    def validate(self) -> None:
        one_of("low_rank_adapter", "low_rank_w_init", self.low_rank_w_init, W_INITS)
        positive_int("low_rank_adapter", "reduction_factor", self.reduction_factor)
        positive_int("low_rank_adapter", "low_rank_rank", self.low_rank_rank)
        one_of("low_rank_adapter", "non_linearity", self.non_linearity, ACTIVATIONS)


class LowRankLinear(nn.Module):
    """y = x · (left · right) + bias, with ``left`` (in × rank) and ``right`` (rank × out)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, zero: bool,
                 device: torch.device, dtype: torch.dtype, w_init: str = "glorot-uniform") -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        self.right = nn.Parameter(torch.empty(rank, out_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_dim, device=device, dtype=dtype))
        if not self.left.is_meta:
            initialise = nn.init.xavier_uniform_ if w_init == "glorot-uniform" else nn.init.xavier_normal_
            initialise(self.left)
            initialise(self.right)
            nn.init.zeros_(self.bias)
            if zero:  # the up projection starts at zero: attaching changes nothing
                nn.init.zeros_(self.right)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.left) @ self.right + self.bias


def bottleneck(width: int, reduction_factor: int, multiple: int = 1) -> int:
    """width / reduction_factor, rounded down to a multiple of ``multiple`` (at least one)."""
    return max(multiple, (width // reduction_factor) // multiple * multiple)


@register
class LowRankAdapterModel(DeltaBase):
    config_class = LowRankAdapterConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.o", "ff.w2"]

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> DeltaModule:
        device, dtype = self.placement(module)
        config = self.config
        in_dim, out_dim = route_dims(config.route, sizes)
        middle = bottleneck(in_dim, config.reduction_factor)  # type: ignore[attr-defined]
        rank = config.low_rank_rank  # type: ignore[attr-defined]
        w_init = config.low_rank_w_init  # type: ignore[attr-defined]
        return AdapterLayer(LowRankLinear(in_dim, middle, rank, False, device, dtype, w_init),
                            config.non_linearity,  # type: ignore[attr-defined]
                            LowRankLinear(middle, out_dim, rank, True, device, dtype, w_init)).along_features_of(module)
