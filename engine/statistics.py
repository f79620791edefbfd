"""OpenDelta's statistics helpers: parameter counts of a model and of an optimizer's groups.

Counts are of distinct tensors (a weight tied in two places counts once), and exact on meta
models too. "Delta" parameters are those inside delta modules attached to the model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import nn

from engine.errors import ConfigError
from engine.quantization import logical_shape
from engine.visualize import Visualization

if TYPE_CHECKING:
    from engine.delta import DeltaBase

logger = logging.getLogger(__name__)


def _distinct(parameters: Any) -> list[torch.Tensor]:
    return list({id(p): p for p in parameters}.values())


def delta_parameters(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter inside a delta module attached to ``module`` (each once)."""
    return _distinct(p for m in module.modules() if getattr(m, "is_delta_module", False) for p in m.parameters())


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, Any]:
    """Total, trainable and delta parameters of ``module``, their ratios to the total, and the
    CUDA memory allocated now and at most (GiB, summed over devices; 0 without CUDA)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"inspect_module_statistics needs a torch.nn.Module, got {type(module).__name__}")
    every = _distinct(module.parameters())
    total = sum(logical_shape(p).numel() for p in every)
    trainable = sum(logical_shape(p).numel() for p in every if p.requires_grad)
    deltas = sum(logical_shape(p).numel() for p in delta_parameters(module))
    cuda = torch.cuda.is_available()
    devices = range(torch.cuda.device_count()) if cuda else range(0)
    stat = {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_ratio": trainable / total if total else 0.0,
        "delta_parameters": deltas,
        "delta_ratio": deltas / total if total else 0.0,
        "cudamem": sum(torch.cuda.memory_allocated(d) for d in devices) / 1024**3,
        "maxcudamem": sum(torch.cuda.max_memory_allocated(d) for d in devices) / 1024**3,
    }
    if verbose:
        logger.info("module statistics: %s", stat)
    return stat


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Per parameter group (``param_group_0``, …): total and trainable parameters, the trainable
    ratio, and the group's settings (lr, weight decay, …). Unlike OpenDelta's, which returns the
    last group only, every group is returned."""
    stats: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(optimizer.param_groups):
        params = _distinct(group["params"])
        total = sum(logical_shape(p).numel() for p in params)
        trainable = sum(logical_shape(p).numel() for p in params if p.requires_grad)
        stat: dict[str, Any] = {"total_parameters": total, "trainable_parameters": trainable,
                                "trainable_ratio": f"{100 * trainable / total if total else 0.0:.6f}%"}
        stat.update({k: v for k, v in group.items() if k != "params"})
        stats[f"param_group_{index}"] = stat
    if verbose:
        logger.info("optimizer statistics: %s", stats)
    return stats


def log_delta(delta: DeltaBase, module: nn.Module | None = None, *, delta_ratio: bool = True,
              trainable_ratio: bool = True, visualization: bool = True, cuda_memory: bool = True,
              console: Console | None = None) -> dict[str, Any]:
    """What :meth:`DeltaBase.log` prints and returns (see there)."""
    if not isinstance(module, (nn.Module, type(None))):
        raise ConfigError(f"log(module=...) takes the module to show, got a {type(module).__name__} "
                          "(pass a rich Console as console=...)")
    module = delta.backbone_model if module is None else module
    console = console or Console()
    if visualization:
        Visualization(module).structure_graph(console=console)
    stat = inspect_module_statistics(module, verbose=False)
    trainable = delta.num_trainable_parameters()
    percent = 100.0 * trainable / max(stat["total_parameters"] - stat["delta_parameters"], 1)
    console.print(f"{delta.name} ({delta.delta_type}) on {len(delta.modified_paths)} modules: "
                  f"{trainable:,} trainable parameters, {percent:.4f}% of the backbone", highlight=False)
    total = f"{stat['total_parameters']:,}"
    if trainable_ratio:
        console.print(f"Trainable Ratio: {stat['trainable_parameters']:,}/{total}"
                      f"={100 * stat['trainable_ratio']:.6f}%", highlight=False)
    if delta_ratio:
        console.print(f"Delta Parameter Ratio: {stat['delta_parameters']:,}/{total}"
                      f"={100 * stat['delta_ratio']:.6f}%", highlight=False)
    if cuda_memory and torch.cuda.is_available():
        console.print(f"Static Memory {stat['cudamem']:.2f} GB, Max Memory {stat['maxcudamem']:.2f} GB",
                      highlight=False)
    return {"trainable_parameters": trainable, "modules": len(delta.modified_paths),
            "percent_of_backbone": percent, **{k: v for k, v in stat.items() if k != "trainable_parameters"},
            "total_trainable_parameters": stat["trainable_parameters"]}
