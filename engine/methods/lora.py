"""LoRA: h_out ← h_out + B·A·dropout(h_in) · α/r, in parallel with a Linear or Conv1D layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig, positive_int, positive_number, probability
from engine.delta import DeltaBase, DeltaModule, _key, new_linear, zero_init
from engine.errors import DeltaStateError
from engine.methods import register
from engine.routing import RouteHandle, attach_route
from engine.sizing import IOSizes, module_device_dtype


@dataclass
class LoraConfig(DeltaConfig):
    delta_type: ClassVar[str] = "lora"
    routes: ClassVar[tuple[str, ...]] = ("parallel",)

    lora_r: int = field(default=8, metadata={"help": "rank of the update B·A"})
    lora_alpha: float = field(default=16, metadata={"help": "scaling numerator: update × α/r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})

    def validate(self) -> None:
        positive_int("lora", "lora_r", self.lora_r)
        positive_number("lora", "lora_alpha", self.lora_alpha)
        probability("lora", "lora_dropout", self.lora_dropout)


class LoraLayer(DeltaModule):
    """``lora_A`` (r × in, Kaiming uniform) and ``lora_B`` (out × r, zeros): attaching is a no-op."""

    def __init__(
        self, sizes: IOSizes, config: LoraConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        rank = config.lora_r
        self.lora_A = new_linear(sizes.input_dim, rank, False, device, dtype,
                                 lambda layer: nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5)))
        self.lora_B = new_linear(rank, sizes.output_dim, False, device, dtype, zero_init)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling = config.lora_alpha / rank
        self.merged = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.merged:
            return None  # the update lives in the backbone weight
        # scaling the rank-r intermediate costs out/r times less than scaling the output
        return self.lora_B(self.lora_A(self.dropout(hidden)) * self.scaling)

    def weight_update(self, transpose: bool) -> torch.Tensor:
        """B·A·scaling, shaped like the wrapped weight (Conv1D stores it transposed)."""
        update = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return update.T if transpose else update


@register
class LoraModel(DeltaBase):
    """Low-rank adaptation (Hu et al., 2021) with exact merge/unmerge for inference."""

    config_class = LoraConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.q", "attn.v"]
    supported_modules: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> LoraLayer:
        device, dtype = module_device_dtype(module, self.backbone_model)
        return LoraLayer(sizes, self.config, device, dtype)  # type: ignore[arg-type]

    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        # Linear/Conv1D backward never reads the output, so the update can go in place
        return attach_route("parallel", module, delta, in_place=True)

    @property
    def is_merged(self) -> bool:
        return any(layer.merged for layer in self._layers())

    def _layers(self) -> list[LoraLayer]:
        return [self.delta_modules[_key(p)] for p in self.modified_paths]  # type: ignore[misc]

    def merge(self) -> LoraModel:
        """Add B·A·α/r into each wrapped weight and unhook: inference runs the plain backbone."""
        if not self.is_attached:
            raise DeltaStateError("attach() the delta before merging it")
        if self.is_merged:
            raise DeltaStateError("this LoRA delta is already merged; unmerge() it first")
        self._apply_update(+1)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self

    def unmerge(self) -> LoraModel:
        """Subtract the update again (weights restored up to float rounding) and re-hook."""
        if not self.is_merged:
            raise DeltaStateError("this LoRA delta is not merged")
        self._apply_update(-1)
        for path, module in self._modules_by_path().items():
            self._handles.append(self.wire(path, module, self.delta_modules[_key(path)]))
        return self

    def _apply_update(self, sign: int) -> None:
        modules = self._modules_by_path()
        with torch.no_grad():
            for path, layer in zip(self.modified_paths, self._layers()):
                module = modules[path]
                transpose = type(module).__name__ == "Conv1D"
                module.weight.add_(layer.weight_update(transpose).to(module.weight.dtype), alpha=sign)
                layer.merged = sign > 0

    def before_detach(self) -> None:
        if self.is_merged:
            self.unmerge()
