"""Exact parameter counts of a planned delta, fast enough for a live designer; and what a
design costs in checkpoint bytes and training memory.

A delta module's size depends only on the module it wraps, and structurally identical modules
(same fingerprint) get identical deltas. So :func:`estimate_delta` plans the targets, builds the
delta for one module per fingerprint (on whatever device the backbone is — meta costs nothing)
and multiplies: on a 126-layer model that is 2 small modules instead of 252.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.config import DeltaConfig
from engine.errors import ConfigError
from engine.methods import method_for
from engine.tree import ModuleTree, all_modules

#: Bytes per backbone parameter for the memory estimate's dtype choice.
DTYPE_BYTES: dict[str, float] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}
#: Trainable parameters are kept in float32: weight, gradient, and AdamW's two moments.
TRAINABLE_BYTES = 4 + 4 + 8
CHECKPOINT_BYTES_PER_PARAMETER = 4  # delta.safetensors stores float32


@dataclass(frozen=True)
class DeltaEstimate:
    """Targets of a planned delta and its exact trainable parameters per target."""

    paths: list[str]
    by_module: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def estimate_delta(model: nn.Module, config: DeltaConfig, tree: ModuleTree | None = None) -> DeltaEstimate:
    """Plan ``config`` on ``model`` and count its trainable parameters exactly, nothing attached."""
    tree = tree if tree is not None else ModuleTree.from_model(model)
    method = method_for(config.delta_type)
    modules = all_modules(model)
    targets = method.plan(model, config, modules=modules, tree=tree)
    variants = method.variants(model, config, targets)

    def kind(path: str) -> tuple[int, Any]:
        return tree.node(path).fingerprint, variants.get(path)

    representative: dict[tuple[int, Any], str] = {}
    for path in targets:
        representative.setdefault(kind(path), path)
    delta = method(model, config=config, attach=False, paths=list(representative.values()))
    counts = delta.trainable_parameters_by_module()
    by_module = {p: counts[representative[kind(p)]] for p in targets}
    return DeltaEstimate(targets, by_module)


def module_parameters(tree: ModuleTree, paths: list[str]) -> int:
    """Parameters inside the given modules (each counted once, nested selections included)."""
    chosen = sorted(set(paths))
    roots = [p for i, p in enumerate(chosen) if not any(p.startswith(q + ".") for q in chosen[:i])]
    return sum(tree.node(p).total_parameters for p in roots)


def checkpoint_bytes(trainable: int) -> int:
    """Size of ``delta.safetensors`` without its small JSON header."""
    return trainable * CHECKPOINT_BYTES_PER_PARAMETER


def training_memory(backbone_parameters: int, trainable: int, dtype: str) -> dict[str, Any]:
    """Backbone weights at ``dtype`` plus float32 weights, gradients and AdamW states of the
    trainable parameters. Activations are excluded: they depend on batch and sequence length."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    weights = int(backbone_parameters * DTYPE_BYTES[dtype])
    trainable_bytes = trainable * TRAINABLE_BYTES
    return {"dtype": dtype, "backbone_bytes": weights, "trainable_bytes": trainable_bytes,
            "total_bytes": weights + trainable_bytes, "activations_included": False}
