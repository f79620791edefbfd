"""A fixed sample of architectures across families, built on the meta device, with what role
inference and AutoDelta's defaults give on each — recorded in ``arch_sample.json``.

Regenerate the record after a deliberate change: ``.venv/bin/python -m tests.engine.arch_sample``
(then read the diff: every changed number is a changed default somewhere).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from engine import AutoDeltaModel, load_backbone
from engine.roles import COMMON_NAMES, infer_roles
from engine.roles.kinds import is_channels_first, is_fused_experts, is_projection
from engine.tree import all_modules

RECORD = Path(__file__).with_name("arch_sample.json")
METHODS = ("lora", "adapter", "bitfit")
LORA_RANK, ADAPTER_WIDTH = 8, 24  # the configs' defaults, which the sample uses

SAMPLE: dict[str, list[str]] = {
    "encoder": ["bert", "roberta", "electra", "deberta-v2", "albert", "distilbert", "modernbert", "xlm"],
    "decoder": ["gpt2", "llama", "mistral", "qwen2", "phi", "gemma", "gpt_neox", "falcon", "bloom", "opt",
                "olmo"],
    "encoder-decoder": ["t5", "bart", "mbart", "pegasus", "marian"],
    "vision": ["vit", "deit", "swin", "convnext", "resnet", "dinov2", "beit", "mobilenet_v2"],
    "speech": ["whisper", "wav2vec2", "hubert", "wavlm", "speech_to_text"],
    "multimodal": ["clip", "siglip", "blip", "llava", "git"],
    "moe": ["mixtral", "qwen2_moe", "olmoe", "granitemoe", "jetmoe", "gpt_oss", "deepseek_v2"],
    "attention-free": ["mamba", "mamba2", "rwkv", "fnet"],
}


def survey(model_type: str) -> dict[str, Any]:
    """Roles (with how many modules each) and the default deltas' paths and exact counts."""
    model = load_backbone(f"arch:{model_type}").model
    roles = infer_roles(model)
    row: dict[str, Any] = {
        "roles": {r: len(ps) for r, ps in sorted(roles.by_role.items()) if r in COMMON_NAMES or r == "layers"}}
    for method in METHODS:
        delta = AutoDeltaModel.from_config({"delta_type": method}, model, attach=False)
        row[method] = {"modules": len(delta.modified_paths), "first": delta.modified_paths[0],
                       "trainable": delta.num_trainable_parameters(),
                       "by_shapes": count_from_shapes(method, model, delta.modified_paths)}
    return row


def _width(module: nn.Module, side: int) -> int:
    """Input (side 0) or output (side 1) width of a projection, read from its weight's shape."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":  # (in, out)
        return weight.shape[side]
    if is_channels_first(module):  # (out, in / groups, *kernel)
        return module.out_channels if side else module.in_channels
    if isinstance(module, nn.Embedding):
        return weight.shape[1]
    return weight.shape[1 - side] if weight.dim() == 2 else weight.shape[0]  # Linear (out, in); norms (d,)


def _expert_width(module: nn.Module) -> int:
    """The hidden width fused experts read: (E, out, in) alone, or the width an up- and a
    down-projection share (in either storage order)."""
    shapes = [p.shape for p in module.parameters(recurse=False) if p.dim() == 3]
    if len(shapes) == 1:
        return shapes[0][2]
    first, last = shapes[0], shapes[-1]
    return first[2] if first[2] == last[1] else first[1]


def _output_width(module: nn.Module) -> int:
    """A layer's output width; a block's is its input's, the residual width its first projection
    (or set of experts) reads."""
    if is_fused_experts(module):
        shapes = [p.shape for p in module.parameters(recurse=False) if p.dim() == 3]
        return shapes[0][1] if len(shapes) == 1 else _expert_width(module)  # (E, out, in) alone
    if getattr(module, "weight", None) is not None:
        return _width(module, 1)
    inner = next(m for m in module.modules() if is_projection(m) or is_fused_experts(m))
    return _expert_width(inner) if is_fused_experts(inner) else _width(inner, 0)


def count_from_shapes(method: str, model: nn.Module, paths: list[str]) -> int:
    """Each method's trainable-parameter formula, from the wrapped modules' weight shapes only."""
    modules = all_modules(model)
    total = 0
    for path in paths:
        module = modules[path]
        if method == "lora":
            if is_fused_experts(module):
                total += sum(p.shape[0] * LORA_RANK * (p.shape[1] + p.shape[2])
                             for p in module.parameters(recurse=False) if p.dim() == 3)
            elif is_channels_first(module):
                total += LORA_RANK * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
            else:
                total += LORA_RANK * (_width(module, 0) + _width(module, 1))
        elif method == "adapter":
            width = _output_width(module)
            total += 2 * ADAPTER_WIDTH * width + ADAPTER_WIDTH + width
        else:
            total += _output_width(module)
    return total


def main() -> None:
    record = {family: {t: survey(t) for t in types} for family, types in SAMPLE.items()}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{sum(map(len, SAMPLE.values()))} architectures recorded in {RECORD}")


if __name__ == "__main__":
    main()
