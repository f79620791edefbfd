"""LoRA delta modules for each layer kind, with their merge/unmerge arithmetic.

* :class:`LoraLayer` — Linear and transformers' Conv1D (which stores its weight transposed), with
  optional DoRA (a learned magnitude per output feature over the normalised updated weight);
* :class:`LoraEmbedding` — nn.Embedding (``lora_embedding_A/B`` like PEFT);
* :class:`LoraConv` — nn.Conv1d / nn.Conv2d (A: a conv with the layer's kernel, B: a 1-wide conv);
* :class:`LoraExperts` — transformers 5 fused MoE experts (per-expert factors on 3-D parameters).

The update starts at zero (B = 0), so attaching changes no output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from engine.layers import DeltaModule, new_linear, zero_init
from engine.methods import lora_mixed
from engine.roles.kinds import fused_expert_parameters
from engine.routing import first_tensor, run_delta


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
            norm = self._base(module).detach().to(dtype).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.merged:
            return None  # the update lives in the backbone weight
        return self._lora(self.dropout(hidden))

    def _computes_directly(self, hidden: torch.Tensor, target: torch.Tensor) -> bool:
        """Whether the update may be computed from the factors without calling this module:
        not while training, with dropout active, across dtypes, for DoRA, or when the module
        carries hooks of its own (FSDP's, say), which only a module call would run."""
        weight_a, weight_b = self.lora_A.weight, self.lora_B.weight
        return not (self.merged or self.dora or (self.training and isinstance(self.dropout, nn.Dropout))
                    or not (weight_a.dtype == hidden.dtype == target.dtype)
                    or (torch.is_grad_enabled() and (weight_a.requires_grad or weight_b.requires_grad
                                                     or hidden.requires_grad or target.requires_grad))
                    or self._forward_pre_hooks or self._forward_hooks or _has_global_hooks()
                    or not target.is_contiguous())

    def add_into(self, hidden: torch.Tensor, target: torch.Tensor) -> bool:
        """Inference fast path: ``target += B·(A·hidden)·scaling`` as one small GEMM and one
        ``addmm_`` into the layer's output — no update tensor, no extra pass over the output.
        False (the caller takes the general path) when :meth:`_computes_directly` says no."""
        if not self._computes_directly(hidden, target):
            return False
        flat = target.view(-1, target.shape[-1])
        flat.addmm_(F.linear(hidden.reshape(-1, hidden.shape[-1]), self.lora_A.weight),
                    self.lora_B.weight.t(), alpha=self.scaling)
        return True

    def add_mixed_into(self, module: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> bool:
        """Inference in a mixed-task batch when every delta on ``module`` is a LoRA layer this
        path may compute directly: whichever layer's hook runs first adds every row's own task's
        update at once (:mod:`engine.methods.lora_mixed`), the others find it done. The hooks'
        order need not follow the layers' (an unmerged layer is hooked again last), so "first"
        is whoever finds nothing added yet. False: per-delta path."""
        batch = self.__dict__["_row_selector"].batch()
        if lora_mixed.already_added(batch, module, target):
            return True
        layers = [child for child in module._modules.values() if isinstance(child, DeltaModule)]
        if not all(type(layer) is LoraLayer and layer._computes_directly(hidden, target) for layer in layers):
            return False
        lora_mixed.add_rows(batch, module, layers, hidden, target)
        return True

    def _lora(self, dropped: torch.Tensor) -> torch.Tensor:
        # scaling the rank-r intermediate costs out/r times less than scaling the output
        return self.lora_B(self.lora_A(dropped) * self.scaling)

    @property
    def dora(self) -> bool:
        return hasattr(self, "lora_magnitude_vector")

    def merged_parameters(self, module: nn.Module) -> list[str]:
        """The wrapped module's parameters that merging changes."""
        return ["weight"]

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
            update = self.update()
            norm = (self._base(module).to(update.dtype) + update).norm(dim=1)
        return self.lora_magnitude_vector / norm

    def dora_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        """scale ⊙ (W x + ΔW x) + b, written so that scale = 1 returns ``output`` exactly.

        With dropout active (training), both the update and the rescaled base read the dropped
        input, as PEFT's DoRA does: output + (scale - 1)·W·drop(x) + scale·ΔW·drop(x).
        """
        if self.merged:
            return output
        hidden = first_tensor(args, kwargs)
        scale = self.dora_scale(module).to(output.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            dtype = self.lora_A.weight.dtype
            dropped = self.dropout(hidden.to(dtype))
            lora = self._lora(dropped).to(output.dtype)
            weight = self._base(module)
            base = F.linear(dropped.to(weight.dtype), weight).to(output.dtype)
        else:
            lora = run_delta(self, hidden, output)
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


def _has_global_hooks() -> bool:
    """Whether module hooks registered for every module (``register_module_forward_*``) exist."""
    return bool(torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks)


class AdditiveMerge:
    """Merge by adding ``update()`` (shaped like the weight) into the wrapped weight."""

    merged: bool

    def update(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_parameters(self, module: nn.Module) -> list[str]:
        return ["weight"]

    def merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.add_(self.update().to(module.weight.dtype))
        self.merged = True

    def unmerge(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.sub_(self.update().to(module.weight.dtype))
        self.merged = False


class LoraEmbedding(AdditiveMerge, DeltaModule):
    """out += (one_hot(ids) · Aᵀ) · Bᵀ · scaling, with A (r × vocab) and B (width × r).

    As in loralib and PEFT, A starts at zero and B is normal: the padding row of Aᵀ gets no
    gradient (``padding_idx``), so the padding token's embedding never changes.
    """

    def __init__(self, module: nn.Embedding, rank: int, scaling: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, module.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(module.embedding_dim, rank, device=device, dtype=dtype))
        if not self.lora_embedding_B.is_meta:
            nn.init.normal_(self.lora_embedding_B)
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



class LoraConv(AdditiveMerge, DeltaModule):
    """A: a convolution (in → r) with the layer's kernel, stride, padding, dilation and padding
    mode (circular, reflect, …: the same padded input, so merging stays exact); B: a 1-wide one
    (r → out), zeros. For ungrouped nn.Conv1d and nn.Conv2d (subclasses included: A and B are plain
    convolutions); grouped ones are refused by LoraModel.check_module."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d, rank: int, scaling: float, dropout: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        conv = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
        self.lora_A = conv(module.in_channels, rank, module.kernel_size, module.stride,
                           module.padding, module.dilation, bias=False, padding_mode=module.padding_mode,
                           device=device, dtype=dtype)
        self.lora_B = conv(rank, module.out_channels, 1, bias=False, device=device, dtype=dtype)
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
        return torch.einsum("or,ri...->oi...", self.lora_B.weight.flatten(1), self.lora_A.weight) * self.scaling


class LoraExperts(DeltaModule):
    """Per-expert low-rank factors on each fused 3-D parameter (as PEFT's ``target_parameters``):
    W[e] + B[e]·A[e]·scaling, with A (experts × r × columns, Kaiming) and B (experts × rows × r, zeros).

    The experts' forward reads its parameters by name, so a forward hook runs that forward again
    on a per-call *view* of the module whose parameters are the updated weights — nothing on the
    module itself is swapped, so concurrent calls and detaching in any order are safe. Several
    LoRA deltas on one experts module are summed in one recomputation (the hook runs first,
    before other deltas' hooks on that module). The backbone's own pass is discarded, so an
    unmerged expert LoRA costs the experts twice; merge it for inference.
    """

    def __init__(self, module: nn.Module, rank: int, scaling: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.names = fused_expert_parameters(module)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.names:
            experts, rows, columns = getattr(module, name).shape
            factor_a = torch.empty(experts, rank, columns, device=device, dtype=dtype)
            if not factor_a.is_meta:
                for expert in factor_a:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(factor_a)
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, rows, rank, device=device, dtype=dtype))
        self.scaling = scaling
        self.merged = False

    def merged_parameters(self, module: nn.Module) -> list[str]:
        return list(self.names)

    def mixed_batch_refusal(self) -> str | None:
        return ("LoRA on fused experts updates the experts' weights, which every row's tokens share "
                "after routing")

    def update(self, name: str) -> torch.Tensor:
        """B·A·scaling for every expert, shaped like the parameter."""
        return torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scaling

    def recompute(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        active = [child for child in module._modules.values()
                  if isinstance(child, LoraExperts) and not child.merged]
        if not active or active[-1] is not self:
            return output  # the last attached one (its hook runs first) computes for all of them
        weights = {}
        for name in self.names:
            base = module._parameters[name]
            weights[name] = base + sum(delta.update(name) for delta in active).to(base.dtype)
        return type(module).forward(_with_parameters(module, weights), *args, **kwargs)

    def hooks(self, module: nn.Module) -> list[Any]:
        return [module.register_forward_hook(self.recompute, with_kwargs=True, prepend=True)]

    def merge(self, module: nn.Module) -> None:
        self._fold(module, 1)
        self.merged = True

    def unmerge(self, module: nn.Module) -> None:
        self._fold(module, -1)
        self.merged = False

    def _fold(self, module: nn.Module, sign: int) -> None:
        with torch.no_grad():
            for name in self.names:
                weight = getattr(module, name)
                weight.add_(self.update(name).to(weight.dtype), alpha=sign)


def _with_parameters(module: nn.Module, replaced: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow per-call view of ``module`` whose named parameters read ``replaced``; the module
    itself is untouched."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_parameters"] = {**module._parameters, **replaced}
    return view


def shared_with(modules: dict[str, nn.Module], module: nn.Module, name: str) -> list[str]:
    """Other modules' parameters that are the same tensor as ``module.<name>`` (or share its
    storage): ``path.parameter`` of each."""
    tensor = getattr(module, name)
    storage = None if tensor.is_meta else tensor.untyped_storage().data_ptr()
    found = []
    for path, other in modules.items():
        if other is module:
            continue
        for other_name, parameter in other.named_parameters(recurse=False):
            same = parameter is tensor or (
                storage is not None and not parameter.is_meta and parameter.untyped_storage().data_ptr() == storage)
            if same:
                found.append(f"{path}.{other_name}" if path else other_name)
    return found
