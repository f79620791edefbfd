"""Training memory on real hardware, planned without weights: what one GPU holds while a delta
trains — the backbone's weights in their format, the trainable parameters with their gradients
and optimizer states, and the activations kept for the backward pass — and whether it fits.

This is the one memory model: the designer's live line, the planner and the compare view all
use these functions and this one table of bytes. Activations come from the architecture itself,
not a rule of thumb (:mod:`engine.memory_trace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from engine.errors import ConfigError
from engine.memory_trace import ActivationTrace
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

    gpu_bytes: int = 80 * 2**30  # GiB, as the page's GPU sizes
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
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations and unquantised weights are in."""
        return torch.float32 if WEIGHT_FORMATS[self.weight_format][1] == 4 else torch.bfloat16

    def describe(self) -> str:
        """One line a person reads: the setup a memory figure assumes."""
        return (f"{self.weight_format} weights, {self.optimizer}, batch {self.batch} × {self.sequence} tokens, "
                f"{self.attention} attention" + (", checkpointing" if self.checkpointing else "")
                + (f", {self.gpus} GPUs" + (" FSDP" if self.sharding == "fsdp" else "") if self.gpus > 1 else ""))


def weight_bytes(backbone: nn.Module, setup: TrainingSetup) -> int:
    """The backbone's parameters in the setup's format (exact, from shapes)."""
    quantisation, other = WEIGHT_FORMATS[setup.weight_format]
    return quantised_bytes(backbone, quantisation, other)


def trainable_state_bytes(trainable: int, setup: TrainingSetup) -> int:
    """Each trainable parameter's float32 value and gradient and the optimizer's states, per GPU."""
    return trainable * (TRAINABLE_VALUE_BYTES + OPTIMIZER_STATE_BYTES[setup.optimizer]) // _shards(setup)


def activation_bytes(trace: ActivationTrace) -> int:
    """The most the training step holds at once beyond weights and trainable states: what the
    backward pass needs of the forward, the output and loss, and the backward's own gradients."""
    return trace.peak


def plan_memory(backbone_weight_bytes: int, trainable: int, trace: ActivationTrace | None,
                setup: TrainingSetup) -> dict[str, Any]:
    """What one GPU holds, by part, and whether it fits. The formulas are returned with it.
    Without a ``trace`` the activations are left out (and the answer says so)."""
    shards = _shards(setup)
    layers = trace.layers if trace is not None else 1
    weights = backbone_weight_bytes // shards
    gathered = backbone_weight_bytes // layers if shards > 1 else 0  # one layer unsharded at a time
    states = trainable_state_bytes(trainable, setup)
    activations = activation_bytes(trace) if trace is not None else 0
    total = weights + gathered + states + activations
    return {
        "weights": weights, "gathered_layer": gathered, "trainable_states": states,
        "activations": activations, "activations_included": trace is not None,
        "total_per_gpu": total, "gpu_bytes": setup.gpu_bytes,
        "fits": total <= setup.gpu_bytes, "gpus": setup.gpus, "layers": layers,
        "setup": setup.describe(),
        "formula": _formulas(setup, shards),
    }


def _shards(setup: TrainingSetup) -> int:
    return setup.gpus if setup.sharding == "fsdp" else 1


def _formulas(setup: TrainingSetup, shards: int) -> dict[str, str]:
    return {
        "weights": f"backbone parameters in {setup.weight_format}"
                   + (" (Linear and Conv1D weights 4-bit/8-bit with their scales, the rest in bf16)"
                      if WEIGHT_FORMATS[setup.weight_format][0] else "")
                   + (f", ÷ {shards} GPUs (FSDP full shard) + one layer gathered" if shards > 1 else ""),
        "trainable_states": f"trainable × (4 float32 value + 4 gradient + "
                            f"{OPTIMIZER_STATE_BYTES[setup.optimizer]} {setup.optimizer} state) bytes"
                            + (f" ÷ {shards} GPUs" if shards > 1 else ""),
        "activations": (
            "the most one training step holds at once beyond the weights and trainable states — tensors "
            "autograd keeps (not the frozen weights it refers to), the output and loss, the backward pass's "
            "gradients — found by running forward and backward on the meta device with the design attached"
            + ("; attention as fused kernels (flash / memory-efficient) keep it: no sequence × sequence "
               "scores" if setup.attention == "flash" else "; eager attention: the scores are kept")
            + ("; with transformers' gradient checkpointing (each layer recomputed in the backward pass)"
               if setup.checkpointing else "")),
    }
