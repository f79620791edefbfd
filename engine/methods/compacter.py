"""Compacter (Mahabadi et al., 2021): adapters whose projections are parameterised hypercomplex
multiplication (PHM) layers, W = Σᵢ Aᵢ ⊗ Bᵢ over n = hypercomplex_division terms, with each Bᵢ
a rank-``phm_rank`` product. Each layer keeps its own rule Aᵢ (OpenDelta can share them across
layers; kept per layer here so every checkpoint tensor has one owner)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig, one_of, positive_int
from engine.building import DeltaModule
from engine.delta import DeltaBase
from engine.errors import ModuleNotSupportedError
from engine.methods import register
from engine.methods.adapter import ACTIVATIONS, AdapterLayer, route_dims
from engine.methods.low_rank_adapter import bottleneck
from engine.sizing import IOSizes, module_device_dtype


@dataclass
class CompacterConfig(DeltaConfig):
    delta_type: ClassVar[str] = "compacter"
    routes: ClassVar[tuple[str, ...]] = ("after", "before", "parallel")

    reduction_factor: int = field(default=16, metadata={"help": "bottleneck = width / reduction_factor"})
    hypercomplex_division: int = field(default=4, metadata={"help": "n: Kronecker terms and block size"})
    phm_rank: int = field(default=1, metadata={"help": "rank of each Bᵢ"})
    non_linearity: str = field(default="gelu_new", metadata={
        "help": "activation between down and up", "choices": ACTIVATIONS})

    def validate(self) -> None:
        for name in ("reduction_factor", "hypercomplex_division", "phm_rank"):
            positive_int("compacter", name, getattr(self, name))
        one_of("compacter", "non_linearity", self.non_linearity, ACTIVATIONS)


class PHMLinear(nn.Module):
    """y = x · Σᵢ (rule[i] ⊗ left[i]·right[i]) + bias."""

    def __init__(self, in_dim: int, out_dim: int, n: int, rank: int, zero: bool,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
        self.left = nn.Parameter(torch.empty(n, in_dim // n, rank, device=device, dtype=dtype))
        self.right = nn.Parameter(torch.empty(n, rank, out_dim // n, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_dim, device=device, dtype=dtype))
        if not self.rule.is_meta:
            nn.init.normal_(self.rule, std=0.01)
            nn.init.normal_(self.left, std=0.1)
            nn.init.normal_(self.right, std=0.1)
            nn.init.zeros_(self.bias)
            if zero:
                nn.init.zeros_(self.right)

    def weight(self) -> torch.Tensor:
        blocks = self.left @ self.right  # (n, in/n, out/n)
        return sum(torch.kron(self.rule[i], blocks[i]) for i in range(self.rule.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight() + self.bias


@register
class CompacterModel(DeltaBase):
    config_class = CompacterConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.o", "ff.w2"]

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> DeltaModule:
        device, dtype = module_device_dtype(module, self.backbone_model)
        config = self.config
        n = config.hypercomplex_division  # type: ignore[attr-defined]
        in_dim, out_dim = route_dims(config.route, sizes)
        if in_dim % n or out_dim % n:
            raise ModuleNotSupportedError(
                f"compacter needs widths divisible by hypercomplex_division={n}; {path!r} has "
                f"{in_dim} → {out_dim}: choose another hypercomplex_division"
            )
        middle = bottleneck(in_dim, config.reduction_factor, n)  # type: ignore[attr-defined]
        rank = config.phm_rank  # type: ignore[attr-defined]
        return AdapterLayer(PHMLinear(in_dim, middle, n, rank, False, device, dtype),
                            config.non_linearity,  # type: ignore[attr-defined]
                            PHMLinear(middle, out_dim, n, rank, True, device, dtype)).along_features_of(module)
