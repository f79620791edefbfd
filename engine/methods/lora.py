"""LoRA: h_out ← h_out + B·A·dropout(h_in) · α/r, in parallel with a Linear, Conv1D, Embedding,
Conv1d or Conv2d layer, or W[e] + B[e]·A[e] · α/r on each expert of a fused mixture of experts.
Options: rank-stabilised scaling (α/√r), DoRA, and per-module rank/alpha patterns keyed by
addressing expressions."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from engine.addressing import resolve_each
from engine.config import DeltaConfig, positive_int, positive_number, probability
from engine.delta import DeltaBase, _key
from engine.errors import ConfigError, DeltaStateError, ModuleNotSupportedError
from engine.layers import DeltaModule
from engine.locking import model_lock
from engine.methods.lora_layers import (
    LoraConv,
    LoraEmbedding,
    LoraExperts,
    LoraLayer,
    shared_with,
)
from engine.quantization import refuse_merge, weight_format
from engine.registry import register
from engine.roles import ModelStructure, expand_common_names
from engine.roles.kinds import declares_linear, is_fused_experts
from engine.routing import RouteHandle, attach_route, on_rows
from engine.tree import all_modules

logger = logging.getLogger(__name__)


@dataclass
class LoraConfig(DeltaConfig):
    delta_type: ClassVar[str] = "lora"
    routes: ClassVar[tuple[str, ...]] = ("parallel",)

    lora_r: int = field(default=8, metadata={"help": "rank of the update B·A"})
    lora_alpha: float = field(default=16, metadata={"help": "scaling numerator: update × α/r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by α/√r (rank-stabilised)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={
        "help": "addressing expression → rank for the modules it matches"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={
        "help": "addressing expression → alpha for the modules it matches"})

    def validate(self) -> None:
        positive_int("lora", "lora_r", self.lora_r)
        positive_number("lora", "lora_alpha", self.lora_alpha)
        probability("lora", "lora_dropout", self.lora_dropout)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"lora: {name} must be true or false, got {getattr(self, name)!r}")
        for name, check in (("rank_pattern", positive_int), ("alpha_pattern", positive_number)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ConfigError(f"lora: {name} must map addressing expressions to numbers, got {pattern!r}")
            for expression, value in pattern.items():
                check("lora", f"{name}[{expression!r}]", value)

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@register
class LoraModel(DeltaBase):
    """Low-rank adaptation (Hu et al., 2021) with exact merge/unmerge for inference."""

    config_class = LoraConfig
    default_modified_modules: ClassVar[list[str]] = ["attn.q", "attn.v"]
    supported_modules: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d")

    @classmethod
    def check_module(cls, path: str, module: nn.Module) -> None:
        if is_fused_experts(module):  # fused experts: their 3-D parameters take per-expert factors
            return
        super().check_module(path, module)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            raise ModuleNotSupportedError(
                f"lora cannot wrap {path!r}, a grouped convolution (groups={module.groups}): a low-rank "
                "update mixes channels across groups, so it could never be merged into the grouped "
                "weight and would not be the LoRA of that layer; choose ungrouped convolutions, or "
                "another method (adapter, bitfit) for this one")

    @classmethod
    def variants(cls, structure: ModelStructure, config: DeltaConfig, paths: list[str]) -> dict[str, Any]:
        """Each path's (rank, alpha): the first pattern expression matching it, else the default.
        A pattern expression that matches no module at all is an error, as everywhere. Every
        pattern is resolved against one index of the model, so the cost grows with the number of
        matches, not patterns × modules."""
        def per_path(pattern: dict[str, Any], default: Any) -> dict[str, Any]:
            memo = ("lora pattern", tuple(pattern.items()))  # planning and building share it
            chosen = structure.memo.get(memo)
            if chosen is None:
                keys = list(pattern)
                expanded = [expand_common_names(structure, [key]) for key in keys]
                matched = iter(resolve_each(structure.tree, [e for group in expanded for e in group]))
                chosen = {}
                for key, expressions in zip(keys, expanded):
                    for path in (p for _ in expressions for p in next(matched)):
                        chosen.setdefault(path, pattern[key])
                if len(structure.memo) > 256:  # a long-lived structure (the designer's) stays bounded
                    structure.memo.clear()
                structure.memo[memo] = chosen
            return {p: chosen.get(p, default) for p in paths}

        ranks = per_path(config.rank_pattern, config.lora_r)  # type: ignore[attr-defined]
        alphas = per_path(config.alpha_pattern, config.lora_alpha)  # type: ignore[attr-defined]
        return {p: (ranks[p], alphas[p]) for p in paths}

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        config: LoraConfig = self.config  # type: ignore[assignment]
        settings = self.variants(self.structure(), config, list(modules))
        linear = {p: m for p, m in modules.items() if not isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d))
                  and not is_fused_experts(m)}
        if config.use_dora:
            other = [p for p in modules if p not in linear]
            if other:
                raise ModuleNotSupportedError(
                    f"use_dora supports Linear and Conv1D layers here; {other[0]!r} is a "
                    f"{type(modules[other[0]]).__name__} — leave it out or turn use_dora off")
            quantised = [p for p, m in modules.items() if weight_format(m) is not None]
            if quantised:
                raise ModuleNotSupportedError(
                    f"use_dora cannot wrap {quantised[0]!r}: its weight is {weight_format(modules[quantised[0]])}"
                    "-quantised and DoRA reads the full weight on every step; use plain LoRA on a quantised "
                    "backbone (QLoRA), or load it unquantised for DoRA")
        experts = [p for p, m in modules.items() if is_fused_experts(m)]
        if experts and config.lora_dropout:
            raise ModuleNotSupportedError(
                f"lora_dropout drops a layer's input, but {experts[0]!r} (fused experts) takes its update "
                "on the weights — set lora_dropout to 0 or leave the experts out")
        sizes = self.module_sizes(linear)
        result: dict[str, DeltaModule] = {}
        for path, module in modules.items():
            device, dtype = self.placement(module)
            rank, alpha = settings[path]
            scaling = config.scaling(rank, alpha)
            if isinstance(module, nn.Embedding):
                result[path] = LoraEmbedding(module, rank, scaling, device, dtype)
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
                result[path] = LoraConv(module, rank, scaling, config.lora_dropout, device, dtype)
            elif is_fused_experts(module):
                result[path] = LoraExperts(module, rank, scaling, device, dtype)
            else:
                result[path] = LoraLayer(module, sizes[path].input_dim, sizes[path].output_dim, rank,
                                         scaling, config.lora_dropout, config.use_dora, device, dtype)
        return result

    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        if isinstance(delta, LoraExperts):
            return RouteHandle(delta.hooks(module))
        if getattr(delta, "dora", False):
            return RouteHandle([module.register_forward_hook(on_rows(self.row_selector, delta.dora_hook), with_kwargs=True)])  # type: ignore[attr-defined]
        # these layers' backward never reads their output, so the update can go in place
        return attach_route("parallel", module, delta, in_place=True, select=self.row_selector)

    @property
    def is_merged(self) -> bool:
        return any(layer.merged for layer in self._layers())

    def _layers(self) -> list[Any]:
        return [self.delta_modules[_key(p)] for p in self.modified_paths]

    def merge(self, untie: bool = False) -> LoraModel:
        """Fold the update into each wrapped weight and unhook: inference runs the plain backbone.

        A weight shared with another module (GPT-2's ``lm_head`` is its input embedding) is
        refused: merging would change the other module too. ``untie=True`` first gives each such
        module its own copy of the weight (logged); unmerging does not tie them again.
        """
        with model_lock(self.backbone_model):
            if not self.is_attached:
                raise DeltaStateError("attach() the delta before merging it")
            if self.is_merged:
                raise DeltaStateError("this LoRA delta is already merged; unmerge() it first")
            modules = self._modules_by_path()
            every = all_modules(self.backbone_model)
            for path, module in modules.items():
                refuse_merge(module, path, "a LoRA update")
                if declares_linear(module):
                    raise DeltaStateError(
                        f"cannot merge into {path!r}, a {type(module).__name__}: its forward is its own "
                        "(it may quantise the weight on the fly), so a merged weight need not compute the "
                        "same; keep the delta unmerged")
            for (path, module), layer in zip(modules.items(), self._layers()):
                for name in layer.merged_parameters(module):
                    others = shared_with(every, module, name)
                    if others and not untie:
                        raise DeltaStateError(
                            f"cannot merge into {path}.{name}: that tensor is shared with "
                            f"{', '.join(others[:3])} (tied weights), which merging would change too. "
                            "Keep the delta unmerged (its output is exact), or merge(untie=True) to give "
                            f"{path!r} its own copy of the weight first")
                    if others:
                        original = getattr(module, name)
                        setattr(module, name, nn.Parameter(original.detach().clone(),
                                                           requires_grad=original.requires_grad))
                        logger.info("untied %s.%s from %s before merging", path, name, ", ".join(others))
            for (path, module), layer in zip(modules.items(), self._layers()):
                layer.merge(module)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        return self

    def unmerge(self) -> LoraModel:
        """Take the update out again (weights restored up to float rounding) and re-hook."""
        with model_lock(self.backbone_model):
            if not self.is_merged:
                raise DeltaStateError("this LoRA delta is not merged")
            for (path, module), layer in zip(self._modules_by_path().items(), self._layers()):
                layer.unmerge(module)
                self._handles.append(self.wire(path, module, layer))
        return self

    def before_detach(self) -> None:
        if self.is_merged:
            self.unmerge()
