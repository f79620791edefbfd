"""LoRA delta modules for each layer kind, with their merge/unmerge arithmetic.

* :class:`LoraLayer` — Linear and transformers' Conv1D (which stores its weight transposed), with
  optional DoRA (a learned magnitude per output feature over the normalised updated weight);
* :class:`LoraEmbedding` — nn.Embedding (``lora_embedding_A/B`` like PEFT);
* :class:`LoraConv2d` — nn.Conv2d (A: a conv with the layer's kernel, B: a 1×1 conv).

The update starts at zero (B = 0), so attaching changes no output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.building import DeltaModule, new_linear, zero_init
from engine.routing import first_tensor


class LoraLayer(DeltaModule):
    """``lora_A`` (r × in, Kaiming uniform) and ``lora_B`` (out × r, zeros)."""

    def __init__(self, module: nn.Module, in_dim: int, out_dim: int, rank: int, scaling: float,
                 dropout: float, dora: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.transposed = type(module).__name__ == "Conv1D"
        self.lora_A = new_linear(in_dim, rank, False, device, dtype,
                                 lambda layer: nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5)))
        self.lora_B = new_linear(rank, out_dim, False, device, dtype, zero_init)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = scaling
        self.merged = False
        if dora:
            norm = self._base(module).detach().norm(dim=1).to(dtype)
            self.lora_magnitude_vector = nn.Parameter(norm.clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.merged:
            return None  # the update lives in the backbone weight
        # scaling the rank-r intermediate costs out/r times less than scaling the output
        return self.lora_B(self.lora_A(self.dropout(hidden)) * self.scaling)

    @property
    def dora(self) -> bool:
        return hasattr(self, "lora_magnitude_vector")

    def _base(self, module: nn.Module) -> torch.Tensor:
        """The wrapped weight as (out, in)."""
        return module.weight.T if self.transposed else module.weight

    def update(self) -> torch.Tensor:
        """B·A·scaling as (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_scale(self, module: nn.Module) -> torch.Tensor:
        """magnitude / ‖W + ΔW‖ per output feature. As in DoRA, the norm is a constant for
        autograd, so it is computed without recording a graph for the (out × in) update."""
        with torch.no_grad():
            norm = (self._base(module) + self.update()).norm(dim=1)
        return self.lora_magnitude_vector / norm

    def dora_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        """scale ⊙ (W x + ΔW x) + b, written so that scale = 1 returns ``output`` exactly."""
        if self.merged:
            return output
        lora = self(first_tensor(args, kwargs))
        scale = self.dora_scale(module)
        base = output - module.bias if module.bias is not None else output
        # two fused passes over the output: output + (scale - 1)·base, then + scale·lora in place
        return torch.addcmul(output, base, scale - 1).addcmul_(lora, scale)

    def merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            weight = self._base(module)
            if self.dora:
                scale = self.dora_scale(module)
                self.register_buffer("merged_scale", scale.clone(), persistent=False)
                weight.copy_((weight + self.update()) * scale[:, None])
            else:
                weight.add_(self.update().to(weight.dtype))
        self.merged = True

    def unmerge(self, module: nn.Module) -> None:
        with torch.no_grad():
            weight = self._base(module)
            if self.dora:
                weight.copy_(weight / self.merged_scale[:, None] - self.update())
                del self.merged_scale
            else:
                weight.sub_(self.update().to(weight.dtype))
        self.merged = False


class AdditiveMerge:
    """Merge by adding ``update()`` (shaped like the weight) into the wrapped weight."""

    merged: bool

    def update(self) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.add_(self.update().to(module.weight.dtype))
        self.merged = True

    def unmerge(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.sub_(self.update().to(module.weight.dtype))
        self.merged = False


class LoraEmbedding(AdditiveMerge, DeltaModule):
    """out += (one_hot(ids) · Aᵀ) · Bᵀ · scaling, with A (r × vocab) and B (width × r)."""

    def __init__(self, module: nn.Embedding, rank: int, scaling: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.empty(rank, module.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.zeros(module.embedding_dim, rank, device=device, dtype=dtype))
        if not self.lora_embedding_A.is_meta:
            nn.init.normal_(self.lora_embedding_A)
        self.padding_idx = module.padding_idx
        self.scaling = scaling
        self.merged = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.merged:
            return None
        looked_up = F.embedding(ids, self.lora_embedding_A.T, padding_idx=self.padding_idx)
        return (looked_up @ self.lora_embedding_B.T) * self.scaling

    def update(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling



class LoraConv2d(AdditiveMerge, DeltaModule):
    """A: Conv2d(in → r) with the layer's kernel/stride/padding; B: 1×1 Conv2d(r → out), zeros."""

    def __init__(self, module: nn.Conv2d, rank: int, scaling: float, dropout: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride,
                                module.padding, module.dilation, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Conv2d(rank, module.out_channels, 1, bias=False, device=device, dtype=dtype)
        if not self.lora_B.weight.is_meta:
            nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = scaling
        self.merged = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.merged:
            return None
        return self.lora_B(self.lora_A(self.dropout(hidden))) * self.scaling

    def update(self) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight) * self.scaling

