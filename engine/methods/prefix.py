"""Prefix tuning: trainable key/value vectors prepended in every selected attention module.

transformers 5 attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, …)`` with their query/key/value states (after rotary
embeddings and cache updates). A prefixed module gets a config *view* naming one registered
attention function, ``delta_prefix``, which prepends the prefix keys/values, widens the mask (and
T5's position bias) to cover them, and calls the module's original implementation. Positions,
caches and ``generate()`` are untouched; detaching restores the module's own config object. The
view carries the module's prefixes, so no table outside the model is needed.

With ``reparameterize`` (Li & Liang; OpenDelta's ``ReparameterizeFunction``, PEFT's
``prefix_projection``) one MLP shared by all prefixed layers produces every layer's keys and
values from ``prefix_token_num`` embeddings; after training, :meth:`PrefixModel.fold` replaces it
by the plain prefixes it computes.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from engine.config import DeltaConfig, positive_int
from engine.delta import DeltaBase, _key
from engine.errors import DeltaError, DeltaStateError
from engine.layers import DeltaModule, new_linear
from engine.locking import model_lock
from engine.probe import ProbeComplete, run_pseudo_passes
from engine.registry import register
from engine.roles.kinds import calls_attention_interface
from engine.routing import RouteHandle
from engine.sizing import representatives
from engine.targets import descend_to
from engine.tree import all_modules

IMPLEMENTATION = "delta_prefix"


@dataclass
class PrefixConfig(DeltaConfig):
    delta_type: ClassVar[str] = "prefix"
    routes: ClassVar[tuple[str, ...]] = ("key_value",)

    prefix_token_num: int = field(default=6, metadata={"help": "prefix length (virtual tokens)"})
    reparameterize: bool = field(default=True, metadata={
        "help": "produce all layers' prefixes with one shared MLP"})
    embed_dim: int = field(default=512, metadata={"help": "width of the MLP's prefix embeddings"})
    mid_dim: int = field(default=512, metadata={"help": "hidden width of that MLP"})
    shift_positions: bool = field(default=False, metadata={
        "help": "as PEFT's prefix tuning: the real tokens' positions start after the prefix"})

    def validate(self) -> None:
        positive_int("prefix", "prefix_token_num", self.prefix_token_num)
        positive_int("prefix", "embed_dim", self.embed_dim)
        positive_int("prefix", "mid_dim", self.mid_dim)
        if not isinstance(self.shift_positions, bool):
            raise DeltaError(f"prefix: shift_positions must be true or false, got {self.shift_positions!r}")
        if not isinstance(self.reparameterize, bool):
            raise DeltaError(f"prefix: reparameterize must be true or false, got {self.reparameterize!r}")


@dataclass(frozen=True)
class HeadShape:
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


class PrefixReparameterization(DeltaModule):
    """The shared MLP: embeddings (tokens × embed_dim) → Linear → tanh → Linear to the keys and
    values of every prefixed layer at once (layer i's keys, then its values)."""

    def __init__(self, tokens: int, config: PrefixConfig, widths: list[int],
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.prefix_embedding = nn.Parameter(torch.randn(tokens, config.embed_dim, device=device, dtype=dtype))
        self.hidden = new_linear(config.embed_dim, config.mid_dim, True, device, dtype)
        self.output = new_linear(config.mid_dim, 2 * sum(widths), True, device, dtype)
        self.offsets = [0, *itertools.accumulate(2 * width for width in widths[:-1])]

    def key_values(self, index: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values (tokens × width each); only its slice is computed."""
        hidden = torch.tanh(self.hidden(self.prefix_embedding))
        rows = slice(self.offsets[index], self.offsets[index] + 2 * width)
        return F.linear(hidden, self.output.weight[rows], self.output.bias[rows]).chunk(2, dim=-1)


class PrefixLayer(DeltaModule):
    """Prefix keys/values of one attention module, shaped (heads, tokens, head_dim): its own
    parameters, or its slice of the shared reparameterization."""

    def __init__(self, shape: HeadShape, tokens: int, device: torch.device, dtype: torch.dtype,
                 shared: tuple[PrefixReparameterization, int] | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.tokens = tokens
        if shared is not None:
            object.__setattr__(self, "_shared", shared)  # a reference; registered by its owner layer
        else:
            self.prefix_key = nn.Parameter(0.02 * torch.randn(shape.heads, tokens, shape.head_dim, device=device, dtype=dtype))
            self.prefix_value = nn.Parameter(0.02 * torch.randn(shape.heads, tokens, shape.head_dim, device=device, dtype=dtype))

    #: set by PrefixModel: the backbone's positions are shifted by the prefix (PEFT's convention)
    shifts_positions = False

    def mixed_batch_refusal(self) -> str | None:
        if self.shifts_positions:
            return ("a prefix with shift_positions moves every row's positions, so rows with and "
                    "without it cannot share a batch")
        return None

    def key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.__dict__.get("_shared")
        if shared is not None:
            reparameterization, index = shared
            keys, values = reparameterization.key_values(index, self.shape.width)
            split = (self.tokens, self.shape.heads, self.shape.head_dim)
            return keys.reshape(split).transpose(0, 1), values.reshape(split).transpose(0, 1)
        return self.prefix_key, self.prefix_value


# --- the attention function and per-module bindings ------------------------------------------


class _ConfigView:
    """The module's config with ``_attn_implementation`` reading ``delta_prefix``; it carries the
    module's prefixes, its own attention function and (while sizing) a probe."""

    def __init__(self, base: Any, eager: Callable[..., Any] | None) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_eager", eager)
        object.__setattr__(self, "_prefixes", [])
        object.__setattr__(self, "_probe", None)

    @property
    def _attn_implementation(self) -> str:
        return IMPLEMENTATION

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)


def _view(module: nn.Module) -> _ConfigView | None:
    config = module.__dict__.get("config")
    return config if isinstance(config, _ConfigView) else None


def _prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      *args: Any, **kwargs: Any) -> Any:
    view = _view(module)
    if view is None:
        raise DeltaError(f"{type(module).__name__} runs the prefix attention but has no prefix attached")
    base = object.__getattribute__(view, "_base")
    implementation = base._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, object.__getattribute__(view, "_eager"))
    probe = object.__getattribute__(view, "_probe")
    if probe is not None and probe["thread"] == threading.get_ident():
        probe["shape"] = HeadShape(key.shape[1], key.shape[-1])
        if all("shape" in p for p in probe["all"].values()):
            raise ProbeComplete
    for prefix in object.__getattribute__(view, "_prefixes"):
        keys, values = prefix.key_values()
        count = keys.shape[1]
        batch = key.shape[0]
        selector = prefix.__dict__.get("_row_selector")
        rows = selector(key, type(module).__name__) if selector is not None else None
        if rows is not None and not rows.numel():
            continue  # no row of this batch is this prefix's task
        seen = None
        if rows is not None:  # a mixed-task batch: the other rows must not see these positions
            seen = torch.zeros(batch, dtype=torch.bool, device=key.device).index_fill_(0, rows, True)
        attention_mask = _widen_mask(attention_mask, count, query, key, module, kwargs, implementation, seen)
        key = torch.cat([keys.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([values.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = nn.functional.pad(kwargs["position_bias"], (count, 0))
        kwargs.pop("is_causal", None)
    return original(module, query, key, value, attention_mask, *args, **kwargs)


def _widen_mask(mask: torch.Tensor | None, count: int, query: torch.Tensor, key: torch.Tensor,
                module: nn.Module, kwargs: dict[str, Any], implementation: str,
                seen: torch.Tensor | None = None) -> torch.Tensor | None:
    """Let every query see the ``count`` prefix positions — or, in a mixed-task batch, only the
    queries of the rows ``seen`` marks; keep the causal pattern for the rest."""
    keys = key.shape[2]
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        queries = query.shape[2]
        if not (causal and queries > 1):
            if seen is None:
                return None  # full attention already includes the prefix
            real = torch.ones(queries, keys, dtype=torch.bool, device=query.device)
        else:
            rows = torch.arange(queries, device=query.device)[:, None] + (keys - queries)
            real = torch.arange(keys, device=query.device)[None, :] <= rows
        mask = torch.cat([torch.ones(queries, count, dtype=torch.bool, device=query.device), real], 1)[None, None]
        if seen is not None:
            mask = mask.repeat(seen.shape[0], 1, 1, 1)
            mask[..., :count] = seen[:, None, None, None]
        if implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        return mask
    mask = mask[..., :keys]
    if seen is not None and mask.shape[0] != seen.shape[0]:
        mask = mask.expand(seen.shape[0], *mask.shape[1:])
    shape = (*mask.shape[:-1], count)
    allowed = seen[:, None, None, None].expand(shape) if seen is not None else None
    if mask.dtype == torch.bool:
        pad = allowed if allowed is not None else torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
        if allowed is not None:
            pad = pad.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    return torch.cat([pad, mask], dim=-1)


AttentionInterface.register(IMPLEMENTATION, _prefix_attention)


def dispatches_attention(module: nn.Module) -> bool:
    """A module prefixes can attach to: it calls the attention interface and has a config."""
    return calls_attention_interface(module) and hasattr(module, "config")


def _bind(module: nn.Module) -> _ConfigView:
    """The module's config view, installed on first use (call with the model's lock held)."""
    view = _view(module)
    if view is None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        view = _ConfigView(module.config, eager)
        module.config = view
    return view


def _unbind_if_unused(module: nn.Module) -> None:
    view = _view(module)
    if view is not None and not object.__getattribute__(view, "_prefixes") and object.__getattribute__(view, "_probe") is None:
        module.config = object.__getattribute__(view, "_base")


def _shifted_positions(count: int, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """PEFT's prefix tuning passes the prefix as a cache, so the real tokens' positions start after
    it: give the model those positions. Positions the caller gives (``generate()`` does) count
    real tokens only, so they move by the prefix length, as PEFT moves them."""
    if kwargs.get("position_ids") is not None:
        return args, {**kwargs, "position_ids": kwargs["position_ids"] + count}
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    hidden = ids if ids is not None else kwargs.get("inputs_embeds")
    if hidden is None:
        return args, kwargs
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    start = past + count
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    return args, {**kwargs, "position_ids": positions}


class _PrefixHandle:
    def __init__(self, module: nn.Module, layer: PrefixLayer) -> None:
        self.module, self.layer = module, layer

    def remove(self) -> None:
        view = _view(self.module)
        if view is not None:
            prefixes = object.__getattribute__(view, "_prefixes")
            if self.layer in prefixes:
                prefixes.remove(self.layer)
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
        config: PrefixConfig = self.config  # type: ignore[assignment]
        backbone_modules = all_modules(self.backbone_model)
        shapes = self._head_shapes({p: backbone_modules[p] for p in self.planned_paths})
        shared: PrefixReparameterization | None = None
        if config.reparameterize:
            device, dtype = self.placement(next(iter(modules.values())))
            shared = PrefixReparameterization(config.prefix_token_num, config,
                                              [shapes[p].width for p in self.planned_paths], device, dtype)
            self.shared_modules["reparameterization"] = shared
        result: dict[str, DeltaModule] = {}
        for path, module in modules.items():
            device, dtype = self.placement(module)
            link = (shared, self.planned_paths.index(path)) if shared is not None else None
            layer = PrefixLayer(shapes[path], config.prefix_token_num, device, dtype, link)
            layer.shifts_positions = config.shift_positions
            if shared is not None and not result:
                layer.reparameterization = shared  # registered once, in the first prefixed layer
            result[path] = layer
        return result

    def _head_shapes(self, modules: dict[str, nn.Module]) -> dict[str, HeadShape]:
        """Key heads and head size of each module, recorded by one (early-stopped) pseudo pass."""
        rep = representatives(self.backbone_model, list(modules))
        watched: dict[str, dict[str, Any]] = {path: {} for path in dict.fromkeys(rep.values())}
        thread = threading.get_ident()
        with model_lock(self.backbone_model):
            for path, probe in watched.items():
                probe.update(all=watched, thread=thread)
                object.__setattr__(_bind(modules[path]), "_probe", probe)
            try:
                errors = run_pseudo_passes(
                    self.backbone_model, lambda: all("shape" in p for p in watched.values()))
            finally:
                for path in watched:
                    object.__setattr__(_bind(modules[path]), "_probe", None)
                    _unbind_if_unused(modules[path])
        missing = [p for p in modules if "shape" not in watched[rep[p]]]
        if missing:
            raise DeltaError(
                f"prefix could not find the head sizes of {', '.join(missing[:5])}: a pseudo-input "
                f"pass did not reach them ({errors[-1] if errors else 'never called'})"
            )
        return {p: watched[rep[p]]["shape"] for p in modules}

    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        object.__getattribute__(_bind(module), "_prefixes").append(delta)  # its _row_selector is set
        handles: list[Any] = [_PrefixHandle(module, delta)]
        if self.config.shift_positions and path == self.modified_paths[0]:  # type: ignore[attr-defined]
            count = self.config.prefix_token_num  # type: ignore[attr-defined]
            handles.append(self.backbone_model.register_forward_pre_hook(
                functools.partial(_shifted_positions, count), with_kwargs=True))
        return RouteHandle(handles)

    def fold(self) -> PrefixModel:
        """Replace the shared MLP by the plain prefixes it computes now (same outputs, fewer
        parameters, no MLP to run); the config becomes ``reparameterize=False``."""
        if "reparameterization" not in self.shared_modules:
            raise DeltaStateError("this prefix delta has no reparameterization to fold (reparameterize=False)")
        with model_lock(self.backbone_model), torch.no_grad():
            for path in self.modified_paths:
                layer = self.delta_modules[_key(path)]
                keys, values = layer.key_values()
                del layer.__dict__["_shared"]
                if "reparameterization" in layer._modules:
                    del layer._modules["reparameterization"]
                layer.prefix_key = nn.Parameter(keys.detach().clone().contiguous())
                layer.prefix_value = nn.Parameter(values.detach().clone().contiguous())
            del self.shared_modules["reparameterization"]
            self.config.reparameterize = False  # type: ignore[attr-defined]
        return self
