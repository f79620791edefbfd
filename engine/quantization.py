"""Quantised backbones (QLoRA): recognising bitsandbytes' 4-bit and 8-bit layers, their real
shapes, and what a quantised backbone weighs.

bitsandbytes keeps a 4-bit weight packed (two values a byte, shape ``(n, 1)``) with its true shape
in ``quant_state``; an 8-bit weight as int8 of the true shape with a float scale per row. A
layer is recognised by its weight's class, so this module never imports bitsandbytes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from engine.errors import ConfigError

#: weight formats ``load_backbone(quantization=...)`` accepts
QUANTIZATIONS = ("nf4", "fp4", "int8")
#: bitsandbytes' 4-bit block: one float32 absmax scale per 64 weights (no double quantisation)
BLOCK_SIZE = 64


def weight_format(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes layer's weight; None otherwise."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        state = getattr(weight, "quant_state", None)
        return str(getattr(state, "quant_type", None) or getattr(weight, "quant_type", "nf4"))
    if kind == "Int8Params":
        return "int8"
    return None


def logical_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape a parameter stands for: a packed 4-bit weight's true (out, in) shape."""
    state = getattr(tensor, "quant_state", None)
    if type(tensor).__name__ == "Params4bit" and state is not None and getattr(state, "shape", None) is not None:
        return torch.Size(state.shape)
    return tensor.shape


def refuse_merge(module: nn.Module, path: str, method: str) -> None:
    """A delta cannot be merged into a quantised weight exactly: refuse, naming the layer."""
    found = weight_format(module)
    if found is not None:
        raise ConfigError(
            f"cannot merge {method} into {path!r}: its weight is {found}-quantised, and adding an update "
            "would mean dequantising and quantising again, which changes every weight by the rounding "
            "error. Keep the delta unmerged (it runs as a side path), or load the backbone unquantised "
            "to merge and export a merged model")


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (needs ``pip install .[quant]``)."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError("quantised backbones need bitsandbytes: pip install 'delta-designer[quant]'") from error
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype)


def _not_converted(model: nn.Module) -> list[str]:
    """Module-name patterns transformers' bitsandbytes loading leaves unquantised: the output
    head, tied weights, the last parameter's module (when that parameter is a weight), and the
    model's ``_keep_in_fp32_modules`` (those also stay float32)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = {name for name, module in model.named_modules() if head is not None and module is head}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys |= {str(k) for k in (*tied.keys(), *tied.values())}
    last = next(reversed(list(model.named_parameters())), None)
    if last is not None:
        keys.add(last[0])
    keys = {k.removesuffix(".weight") for k in keys}
    return sorted(keys | set(_keep_in_float32(model)))


def _keep_in_float32(model: nn.Module) -> list[str]:
    return list(getattr(model, "_keep_in_fp32_modules", None) or ()) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())


def _matches(name: str, patterns: list[str]) -> bool:
    """transformers' module-name rule: a pattern from the start up to a dot boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def quantised_modules(model: nn.Module) -> list[nn.Module]:
    """The layers transformers' bitsandbytes loading quantises: every plain ``nn.Linear`` and
    ``Conv1D`` (GPT-2's) but those :func:`_not_converted` names."""
    skipped = _not_converted(model)
    found, seen = [], set()
    for name, module in model.named_modules():
        kind = type(module)
        if (kind is nn.Linear or kind.__name__ == "Conv1D") and not _matches(name, skipped) \
                and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append(module)
    return found


def quantised_bytes(model: nn.Module, quantization: str | None, other_bytes: float) -> int:
    """Bytes of ``model``'s parameters once loaded with ``quantization`` (exact on meta shapes):
    the :func:`quantised_modules` weights as bitsandbytes stores them — 4-bit: half a byte a
    weight plus a float32 scale per 64-weight block; 8-bit: a byte a weight plus a float32 scale
    per output row — and every other parameter at ``other_bytes`` each (the compute dtype), but
    float32 in the modules the model keeps in float32 (T5's ``wo``)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    quantised: set[int] = set()
    total = 0.0
    if quantization is not None:
        for module in quantised_modules(model):
            quantised.add(id(module.weight))
            count = logical_shape(module.weight).numel()
            rows = module.weight.shape[1] if type(module).__name__ == "Conv1D" else logical_shape(module.weight)[0]
            total += count / 2 + 4 * -(-count // BLOCK_SIZE) if quantization != "int8" else count + 4 * rows
    float32 = _keep_in_float32(model)
    kept = {id(p) for name, m in model.named_modules() if float32 and _matches(name, float32) for p in m.parameters()}
    for parameter in {id(p): p for p in model.parameters()}.values():
        if id(parameter) not in quantised:
            total += logical_shape(parameter).numel() * (4 if id(parameter) in kept else other_bytes)
    return int(total)


def keep_differentiable(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first time the layer runs in
    eval mode on an input that needs no gradient — and that kernel has no backward, so from then
    on gradients through the layer are silently dropped (every delta before it trains wrong).
    Turn that repacking off for every 4-bit layer of ``model``, and undo it where it happened
    (bitsandbytes' own ``state_dict`` unpacks)."""
    for module in model.modules():
        if weight_format(module) not in ("nf4", "fp4"):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            module.state_dict()
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise ConfigError(
                    f"a 4-bit layer ({type(module).__name__}) holds its weight in bitsandbytes' CPU inference "
                    "format, through which no gradient flows, and it could not be converted back; reload the "
                    "backbone and attach the deltas before running it for inference")
