"""Training memory on real hardware, planned without weights: what one GPU holds while a delta
trains — the backbone's weights in their format, the trainable parameters with their gradients
and optimizer states, and the activations kept for the backward pass — and whether it fits.

Activations come from the architecture itself, not a rule of thumb: one training forward runs on
the meta device (shapes only, nothing allocated) at the chosen batch × sequence, with the delta
attached, and every tensor autograd saves for the backward pass is counted once per storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from engine.errors import ConfigError
from engine.locking import model_lock
from engine.probe import (
    accepts_use_cache,
    experts_runnable_on_meta,
    module_mode,
    pseudo_input_variants,
)
from engine.quantization import quantised_bytes

#: weight format → (bitsandbytes quantisation, bytes of every other parameter and of activations)
WEIGHT_FORMATS = MappingProxyType({"fp32": (None, 4), "bf16": (None, 2), "int8": ("int8", 2), "nf4": ("nf4", 2)})
#: optimizer → state bytes per trainable parameter (AdamW: two float32 moments; 8-bit AdamW: two
#: bytes; SGD without momentum: none)
OPTIMIZER_STATE_BYTES = MappingProxyType({"adamw": 8, "adamw8bit": 2, "sgd": 0})
#: a trainable parameter's float32 value and gradient
TRAINABLE_VALUE_BYTES = 4 + 4
SHARDINGS = ("none", "fsdp")
#: "flash": fused attention kernels (SDPA's flash / memory-efficient) keep no sequence × sequence
#: scores; "eager": the scores and their dropout mask are kept
ATTENTIONS = ("flash", "eager")
#: most tokens (batch × sequence) one plan traces
MAX_TOKENS = 1 << 24
MAX_GPUS = 4096


@dataclass(frozen=True)
class TrainingSetup:
    """How a delta will train: on which GPUs, in which format, with which optimizer and inputs."""

    gpu_bytes: int = 80 * 10**9
    gpus: int = 1
    sharding: str = "none"
    weight_format: str = "bf16"
    optimizer: str = "adamw"
    batch: int = 1
    sequence: int = 2048
    checkpointing: bool = False
    attention: str = "flash"

    def __post_init__(self) -> None:
        choices = {"sharding": SHARDINGS, "weight_format": tuple(WEIGHT_FORMATS),
                   "optimizer": tuple(OPTIMIZER_STATE_BYTES), "attention": ATTENTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        bounds = {"gpu_bytes": (10**8, 10**14), "gpus": (1, MAX_GPUS), "batch": (1, MAX_TOKENS),
                  "sequence": (1, MAX_TOKENS)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer from {low:,} to {high:,}; got {value!r}")
        if self.batch * self.sequence > MAX_TOKENS:
            raise ConfigError(f"batch × sequence must be at most {MAX_TOKENS:,} tokens; got "
                              f"{self.batch * self.sequence:,}")

    @property
    def compute_bytes(self) -> int:
        return WEIGHT_FORMATS[self.weight_format][1]


def weight_bytes(backbone: nn.Module, setup: TrainingSetup) -> int:
    """The backbone's parameters in the setup's format (exact, from shapes)."""
    quantisation, other = WEIGHT_FORMATS[setup.weight_format]
    return quantised_bytes(backbone, quantisation, other)


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes autograd kept for the backward pass of one traced forward."""

    kept_bytes: int
    #: of which sequence × sequence tensors (attention scores, their masks and dropout)
    score_bytes: int
    layers: int
    hidden: int


def trace_activations(model: nn.Module, setup: TrainingSetup) -> ActivationTrace:
    """Run one training forward of ``model`` (on the meta device, deltas attached, backbone
    frozen) at ``setup.batch`` × ``setup.sequence`` and count what autograd saves: every saved
    storage once, floating-point ones at the setup's compute precision."""
    if any(not p.is_meta for p in model.parameters()):
        raise ConfigError("activations are traced on the meta device: pass the weight-free twin of the model")
    sizes: dict[int, tuple[int, bool]] = {}
    sequence = setup.sequence
    longest = max_positions(model)
    if longest is not None and sequence > longest:
        raise ConfigError(f"sequence {sequence:,} is longer than {type(model).__name__} reads "
                          f"(max_position_embeddings = {longest:,}); plan with at most {longest:,} tokens")

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        element = setup.compute_bytes if tensor.is_floating_point() else tensor.element_size()
        size = storage.nbytes() // max(tensor.element_size(), 1) * element
        scores = tensor.dim() >= 2 and tensor.shape[-1] == sequence and tensor.shape[-2] == sequence
        previous = sizes.get(storage._cdata, (0, False))
        sizes[storage._cdata] = (max(previous[0], int(size)), previous[1] or scores)
        return tensor

    errors = []
    with model_lock(model), module_mode(model, training=True), experts_runnable_on_meta(model):
        for inputs in pseudo_input_variants(model, setup.batch, sequence):
            sizes.clear()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    model(**inputs, use_cache=False) if accepts_use_cache(model) else model(**inputs)
                break
            except Exception as exc:  # noqa: BLE001 - the next input variant may suit the model
                errors.append(f"{type(exc).__name__}: {exc}")
        else:
            raise ConfigError(f"could not trace a training step of {type(model).__name__} on meta: {errors[-1]}")
    config: Any = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    return ActivationTrace(sum(size for size, _ in sizes.values()),
                           sum(size for size, scores in sizes.values() if scores), _layer_count(model), hidden)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model reads (its position table), when its config says."""
    config: Any = getattr(model, "config", None)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return longest if isinstance(longest, int) and not isinstance(longest, bool) else None


def plan_memory(backbone_weight_bytes: int, trainable: int, trace: ActivationTrace,
                setup: TrainingSetup) -> dict[str, Any]:
    """What one GPU holds, by part, and whether it fits. The formulas are returned with it."""
    states = trainable * (TRAINABLE_VALUE_BYTES + OPTIMIZER_STATE_BYTES[setup.optimizer])
    kept = trace.kept_bytes - (trace.score_bytes if setup.attention == "flash" else 0)
    layers = max(trace.layers, 1)
    if setup.checkpointing:
        boundaries = layers * setup.batch * setup.sequence * trace.hidden * setup.compute_bytes
        activations = boundaries + kept // layers
    else:
        activations = kept
    shards = setup.gpus if setup.sharding == "fsdp" else 1
    weights = backbone_weight_bytes // shards
    gathered = backbone_weight_bytes // layers if shards > 1 else 0  # one layer unsharded at a time
    total = weights + gathered + states // shards + activations
    return {
        "weights": weights, "gathered_layer": gathered, "trainable_states": states // shards,
        "activations": activations, "total_per_gpu": total, "gpu_bytes": setup.gpu_bytes,
        "fits": total <= setup.gpu_bytes, "gpus": setup.gpus, "layers": layers,
        "formula": {
            "weights": f"backbone parameters in {setup.weight_format}"
                       + (" (Linear weights 4-bit/8-bit with their scales, the rest in bf16)"
                          if WEIGHT_FORMATS[setup.weight_format][0] else "")
                       + (f", ÷ {shards} GPUs (FSDP full shard) + one layer gathered" if shards > 1 else ""),
            "trainable_states": f"trainable × (4 float32 value + 4 gradient + "
                                f"{OPTIMIZER_STATE_BYTES[setup.optimizer]} {setup.optimizer} state) bytes"
                                + (f" ÷ {shards} GPUs" if shards > 1 else ""),
            "activations": (
                "tensors autograd keeps for the backward pass in one forward at batch × sequence, traced "
                "on the meta device with the design attached"
                + ("; sequence × sequence attention scores left out (flash/memory-efficient attention "
                   "recomputes them)" if setup.attention == "flash" else "")
                + ("; with gradient checkpointing: each layer's input (layers × batch × sequence × hidden "
                   "× bytes) + one layer's kept tensors (recomputed in the backward pass)"
                   if setup.checkpointing else "")),
        },
    }


def _layer_count(model: nn.Module) -> int:
    """Blocks in the model's longest stack of repeated layers (its largest ModuleList)."""
    return max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=1)
