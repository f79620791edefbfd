"""Prefix tuning: trainable key/value vectors prepended in every selected attention module.

transformers 5 attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, …)`` with their query/key/value states (after rotary
embeddings and cache updates). A prefixed module gets a config *view* naming one registered
attention function, ``delta_prefix``, which prepends the prefix keys/values, widens the mask (and
T5's position bias) to cover them, and calls the module's original implementation. Positions,
caches and ``generate()`` are untouched; detaching restores the module's own config object.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from engine.config import DeltaConfig, positive_int
from engine.building import DeltaModule, descend_to, new_linear
from engine.delta import DeltaBase
from engine.errors import DeltaError
from engine.methods import register
from engine.kinds import calls_attention_interface
from engine.routing import RouteHandle
from engine.sizing import (
    ProbeComplete,
    module_device_dtype,
    representatives,
    run_pseudo_passes,
)

IMPLEMENTATION = "delta_prefix"


@dataclass
class PrefixConfig(DeltaConfig):
    delta_type: ClassVar[str] = "prefix"
    routes: ClassVar[tuple[str, ...]] = ("key_value",)

    prefix_token_num: int = field(default=6, metadata={"help": "prefix length (virtual tokens)"})
    reparameterize: bool = field(default=True, metadata={"help": "produce prefixes with an MLP"})
    mid_dim: int = field(default=512, metadata={"help": "hidden width of that MLP"})

    def validate(self) -> None:
        positive_int("prefix", "prefix_token_num", self.prefix_token_num)
        positive_int("prefix", "mid_dim", self.mid_dim)
        if not isinstance(self.reparameterize, bool):
            raise DeltaError(f"prefix: reparameterize must be true or false, got {self.reparameterize!r}")


@dataclass(frozen=True)
class HeadShape:
    heads: int
    head_dim: int


class PrefixLayer(DeltaModule):
    """Prefix keys/values of one attention module, shaped (heads, tokens, head_dim)."""

    def __init__(
        self, shape: HeadShape, config: PrefixConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.shape = shape
        self.tokens = config.prefix_token_num
        width = shape.heads * shape.head_dim
        if config.reparameterize:
            self.prefix_embedding = nn.Parameter(torch.randn(self.tokens, width, device=device, dtype=dtype))
            self.prefix_mlp = nn.Sequential(
                new_linear(width, config.mid_dim, True, device, dtype),
                nn.Tanh(),
                new_linear(config.mid_dim, 2 * width, True, device, dtype),
            )
        else:
            self.prefix_key = nn.Parameter(0.02 * torch.randn(shape.heads, self.tokens, shape.head_dim, device=device, dtype=dtype))
            self.prefix_value = nn.Parameter(0.02 * torch.randn(shape.heads, self.tokens, shape.head_dim, device=device, dtype=dtype))

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "prefix_mlp"):
            keys, values = self.prefix_mlp(self.prefix_embedding).chunk(2, dim=-1)
            split = (self.tokens, self.shape.heads, self.shape.head_dim)
            return keys.view(split).transpose(0, 1), values.view(split).transpose(0, 1)
        return self.prefix_key, self.prefix_value


# --- the attention function and per-module bindings ------------------------------------------


class _ConfigView:
    """The module's config with ``_attn_implementation`` reading ``delta_prefix``."""

    def __init__(self, base: Any) -> None:
        object.__setattr__(self, "_base", base)

    @property
    def _attn_implementation(self) -> str:
        return IMPLEMENTATION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)


@dataclass
class _Binding:
    config: Any
    eager: Callable[..., Any] | None
    prefixes: list[PrefixLayer] = field(default_factory=list)
    probe: dict[str, Any] | None = None


_BINDINGS: weakref.WeakKeyDictionary[nn.Module, _Binding] = weakref.WeakKeyDictionary()


def _prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      *args: Any, **kwargs: Any) -> Any:
    binding = _BINDINGS[module]
    implementation = binding.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, binding.eager)
    if binding.probe is not None:
        binding.probe["shape"] = HeadShape(key.shape[1], key.shape[-1])
        if all("shape" in p for p in binding.probe["all"].values()):
            raise ProbeComplete
    for prefix in binding.prefixes:
        keys, values = prefix.key_values()
        count = keys.shape[1]
        batch = key.shape[0]
        attention_mask = _widen_mask(attention_mask, count, query, key, module, kwargs, implementation)
        key = torch.cat([keys.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([values.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = nn.functional.pad(kwargs["position_bias"], (count, 0))
        kwargs.pop("is_causal", None)
    return original(module, query, key, value, attention_mask, *args, **kwargs)


def _widen_mask(mask: torch.Tensor | None, count: int, query: torch.Tensor, key: torch.Tensor,
                module: nn.Module, kwargs: dict[str, Any], implementation: str) -> torch.Tensor | None:
    """Let every query see the ``count`` prefix positions; keep the causal pattern for the rest."""
    keys = key.shape[2]
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        queries = query.shape[2]
        if not (causal and queries > 1):
            return None  # full attention already includes the prefix
        rows = torch.arange(queries, device=query.device)[:, None] + (keys - queries)
        real = torch.arange(keys, device=query.device)[None, :] <= rows
        mask = torch.cat([torch.ones(queries, count, dtype=torch.bool, device=query.device), real], 1)
        mask = mask[None, None]
        if implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        return mask
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], count, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], count, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


AttentionInterface.register(IMPLEMENTATION, _prefix_attention)


def dispatches_attention(module: nn.Module) -> bool:
    """A module prefixes can attach to: it calls the attention interface and has a config."""
    return calls_attention_interface(module) and hasattr(module, "config")


def _bind(module: nn.Module) -> _Binding:
    binding = _BINDINGS.get(module)
    if binding is None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        binding = _Binding(module.config, eager)
        _BINDINGS[module] = binding
        module.config = _ConfigView(module.config)
    return binding


def _unbind_if_unused(module: nn.Module) -> None:
    binding = _BINDINGS.get(module)
    if binding is not None and not binding.prefixes and binding.probe is None:
        module.config = binding.config
        del _BINDINGS[module]


class _PrefixHandle:
    def __init__(self, module: nn.Module, layer: PrefixLayer) -> None:
        self.module, self.layer = module, layer

    def remove(self) -> None:
        binding = _BINDINGS.get(self.module)
        if binding is not None and self.layer in binding.prefixes:
            binding.prefixes.remove(self.layer)
        _unbind_if_unused(self.module)


@register
class PrefixModel(DeltaBase):
    """Prefix tuning (Li & Liang, 2021) for transformers attention modules."""

    config_class = PrefixConfig
    default_modified_modules: ClassVar[list[str]] = ["attn"]

    @classmethod
    def select_targets(cls, paths: list[str], modules: dict[str, nn.Module]) -> list[str]:
        return descend_to("prefix", paths, modules, dispatches_attention,
                          "transformers attention modules")

    def build_deltas(self, modules: dict[str, nn.Module]) -> dict[str, DeltaModule]:
        shapes = self._head_shapes(modules)
        result: dict[str, DeltaModule] = {}
        for path, module in modules.items():
            device, dtype = module_device_dtype(module, self.backbone_model)
            result[path] = PrefixLayer(shapes[path], self.config, device, dtype)  # type: ignore[arg-type]
        return result

    def _head_shapes(self, modules: dict[str, nn.Module]) -> dict[str, HeadShape]:
        """Key heads and head size of each module, recorded by one (early-stopped) pseudo pass."""
        rep = representatives(self.backbone_model, list(modules))
        watched = {path: {} for path in dict.fromkeys(rep.values())}  # type: dict[str, dict[str, Any]]
        for path, probe in watched.items():
            probe["all"] = watched
            _bind(modules[path]).probe = probe
        try:
            errors = run_pseudo_passes(
                self.backbone_model, lambda: all("shape" in p for p in watched.values()))
        finally:
            for path in watched:
                _BINDINGS[modules[path]].probe = None
                _unbind_if_unused(modules[path])
        missing = [p for p in modules if "shape" not in watched[rep[p]]]
        if missing:
            raise DeltaError(
                f"prefix could not find the head sizes of {', '.join(missing[:5])}: a pseudo-input "
                f"pass did not reach them ({errors[-1] if errors else 'never called'})"
            )
        return {p: watched[rep[p]]["shape"] for p in modules}


    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        _bind(module).prefixes.append(delta)  # type: ignore[arg-type]
        return RouteHandle([_PrefixHandle(module, delta)])  # type: ignore[list-item]
