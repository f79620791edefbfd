"""What kind of layer a module is, and the widths it declares — decided in one place for roles,
sizing and the methods."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class IOSizes:
    """Last-dimension sizes of a module's main input and output."""

    input_dim: int
    output_dim: int


@functools.cache
def _forward_calls_attention_interface(cls: type) -> bool:
    """Whether a class's forward source dispatches through transformers' attention interface (a
    fact about the class, so it is memoised per class; thread-safe)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return False


def calls_attention_interface(module: nn.Module) -> bool:
    """True when the module's forward dispatches through transformers' attention interface."""
    return _forward_calls_attention_interface(type(module))


def is_attention(module: nn.Module) -> bool:
    """An attention block: named so (or calling transformers' attention interface) and holding
    projections — a kernel wrapper or a learned-query "block attention residual" is not one."""
    name = type(module).__name__.lower()
    named = "attention" in name or name.endswith("attn") or calls_attention_interface(module)
    return named and any(is_projection(inner) for inner in module.modules())


def is_linear_like(module: nn.Module) -> bool:
    """A Linear layer, or transformers' Conv1D (GPT-2's linear that stores its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_projection(module: nn.Module) -> bool:
    """A dense layer: Linear, transformers' Conv1D, or a convolution."""
    return is_linear_like(module) or is_channels_first(module)


def is_channels_first(module: nn.Module) -> bool:
    """Convolutions put features on dimension 1 of their input and output, not the last."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d))


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1-wide, ungrouped Conv1d/Conv2d: a Linear applied at every position (channels first)."""
    return is_channels_first(module) and module.groups == 1 and all(k == 1 for k in module.kernel_size)


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of the module's own 3-D parameters: transformers 5 stores MoE experts' projections
    as one (experts, rows, columns) tensor each."""
    return [name for name, param in module.named_parameters(recurse=False) if param.dim() == 3]


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5 mixture-of-experts weights: one module holding (experts, out, in) parameters."""
    return "expert" in type(module).__name__.lower() and bool(fused_expert_parameters(module))


def keeps_width(module: nn.Module) -> bool:
    """Maps the hidden width to itself: an attention block, a set of fused experts or a block
    holding one. Such modules can be sized from their input alone, before their forward runs —
    which matters on the meta device, where routing tokens by value cannot run."""
    return is_attention(module) or any(is_fused_experts(inner) for inner in module.modules())


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: "norm" in its class name, only 1-D (scale/shift) parameters of one
    known width."""
    own = list(module.parameters(recurse=False))
    return ("norm" in type(module).__name__.lower() and bool(own) and all(p.dim() == 1 for p in own)
            and declared_sizes(module) is not None)


def declared_sizes(module: nn.Module) -> IOSizes | None:
    """Sizes a module states itself, without running it."""
    if isinstance(module, nn.Linear):
        return IOSizes(module.in_features, module.out_features)
    if isinstance(module, nn.Embedding):
        return IOSizes(module.num_embeddings, module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return IOSizes(module.in_channels, module.out_channels)
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return IOSizes(module.normalized_shape[-1], module.normalized_shape[-1])
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear
        return IOSizes(module.weight.shape[0], module.nf)
    if is_fused_experts(module):
        return _expert_sizes(module)
    weight = getattr(module, "weight", None)
    if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return IOSizes(weight.shape[0], weight.shape[0])
    if declares_linear(module):
        return IOSizes(module.in_features, module.out_features)
    return None


def declares_linear(module: nn.Module) -> bool:
    """A linear layer of another library that is no ``nn.Linear`` but states its sizes and holds
    an (out, in) weight (I-BERT's ``QuantLinear``): LoRA and adapters can run beside it."""
    in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return (not isinstance(module, nn.Linear) and isinstance(in_features, int) and isinstance(out_features, int)
            and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (out_features, in_features))


def mixture_sizes(module: nn.Module) -> IOSizes | None:
    """A mixture-of-experts block maps the hidden width to itself: its fused experts' width (so
    a block is sized without running it — routing by value cannot run on the meta device)."""
    sizes = [_expert_sizes(m) for m in module.modules() if is_fused_experts(m)]
    if not sizes or None in sizes:
        return None
    # one experts module, or an input and an output one (JetMoE)
    width_in, width_out = sizes[0].input_dim, sizes[-1].output_dim  # type: ignore[union-attr]
    return IOSizes(width_in, width_out) if width_in == width_out else None


def _expert_sizes(module: nn.Module) -> IOSizes | None:
    """Fused experts: one (experts, out, in) weight, or an up- and a down-projection whose shared
    dimension is the hidden width, in either storage order ((E, 2I, H) + (E, H, I), or transposed)."""
    shapes = [getattr(module, name).shape for name in fused_expert_parameters(module)]
    if len(shapes) == 1:
        return IOSizes(shapes[0][2], shapes[0][1])
    first, last = shapes[0], shapes[-1]
    if first[2] == last[1]:
        return IOSizes(first[2], first[2])
    if first[1] == last[2]:
        return IOSizes(first[1], first[1])
    return None
