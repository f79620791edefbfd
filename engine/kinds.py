"""What kind of layer a module is, decided in one place for roles, sizing and the methods."""

from __future__ import annotations

import inspect

from torch import nn

_INTERFACE_CALLERS: dict[type, bool] = {}


def calls_attention_interface(module: nn.Module) -> bool:
    """True when the module's forward dispatches through transformers' attention interface."""
    cls = type(module)
    if cls not in _INTERFACE_CALLERS:
        try:
            _INTERFACE_CALLERS[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _INTERFACE_CALLERS[cls] = False
    return _INTERFACE_CALLERS[cls]


def is_attention(module: nn.Module) -> bool:
    """An attention block: named so (or calling transformers' attention interface) and holding
    projections — a kernel wrapper or a learned-query "block attention residual" is not one."""
    name = type(module).__name__.lower()
    named = "attention" in name or name.endswith("attn") or calls_attention_interface(module)
    return named and any(is_projection(inner) for inner in module.modules())


def is_projection(module: nn.Module) -> bool:
    """A dense layer: Linear, transformers' Conv1D (GPT-2's transposed linear), or a convolution."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or is_channels_first(module)


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
