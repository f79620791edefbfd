"""Soft prompts: trainable token embeddings prepended to the input (Lester et al., 2021).

A forward pre-hook on the model turns ``input_ids`` into ``inputs_embeds`` with the soft tokens in
front and extends ``attention_mask`` (and ``labels``, ``token_type_ids``, explicit
``position_ids``). Encoder-decoder models get the soft tokens on the encoder side, hooked on the
encoder itself, because ``generate()`` calls it directly. During cached decoding only the mask
is extended: the soft tokens already sit in the cache. Position ids a caller passes (as
``generate()`` does) count real tokens only; the prompt shifts them past the soft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from engine.config import DeltaConfig, positive_int, positive_number
from engine.delta import DeltaBase
from engine.errors import ModuleNotSupportedError
from engine.layers import DeltaModule
from engine.registry import register
from engine.roles.kinds import IOSizes
from engine.routing import RouteHandle
from engine.tree import all_modules


@dataclass
class SoftPromptConfig(DeltaConfig):
    delta_type: ClassVar[str] = "soft_prompt"
    routes: ClassVar[tuple[str, ...]] = ("before",)

    soft_token_num: int = field(default=100, metadata={"help": "number of soft tokens"})
    token_init: bool = field(default=True, metadata={
        "help": "start from the embeddings of the first vocabulary tokens (else random)"})
    init_range: float = field(default=0.5, metadata={
        "help": "random start: uniform in ±init_range (OpenDelta's)"})

    def validate(self) -> None:
        positive_int("soft_prompt", "soft_token_num", self.soft_token_num)
        positive_number("soft_prompt", "init_range", self.init_range)


class SoftPrompt(DeltaModule):
    def __init__(self, embedding: nn.Embedding, config: SoftPromptConfig,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        count, width = config.soft_token_num, embedding.embedding_dim
        if config.token_init and not embedding.weight.is_meta and count <= embedding.num_embeddings:
            initial = embedding.weight[:count].detach().clone()
        else:
            initial = torch.empty(count, width, device=device, dtype=dtype).uniform_(
                -config.init_range, config.init_range)
        self.soft_embeds = nn.Parameter(initial.to(device=device, dtype=dtype))

    def mixed_batch_refusal(self) -> str | None:
        return ("a soft prompt makes its rows' sequences longer, so one batch cannot hold rows with "
                "and without it (prefix tuning gives every row the same length and can mix)")

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` (batch, length, width) with the soft tokens in front."""
        soft = self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([soft, embeds], dim=1)


def _cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already cached; transformers ≥ 5.24 passes the cache as ``cache``."""
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if past else 0


def _prepend(tensor: torch.Tensor | None, count: int, value: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    pad = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


class _SoftPromptHooks:
    """The pre-hooks that apply one soft prompt; ``remove()`` detaches them."""

    def __init__(self, model: nn.Module, embedding: nn.Embedding, prompt: SoftPrompt) -> None:
        self.embedding, self.prompt = embedding, prompt
        self.count = prompt.soft_embeds.shape[0]
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if self.encoder_decoder:
            self.handles = [model.get_encoder().register_forward_pre_hook(self.encoder, with_kwargs=True),
                            model.register_forward_pre_hook(self.seq2seq, with_kwargs=True)]
        else:
            self.handles = [model.register_forward_pre_hook(self.model, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _embed(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], int]:
        """Move ``input_ids`` (keyword or first positional) into ``inputs_embeds`` with the prompt."""
        kwargs = dict(kwargs)
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.embedding(ids)
        kwargs["inputs_embeds"] = self.prompt(embeds)
        return args, kwargs, embeds.shape[1]

    def model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Encoder-only and decoder-only models."""
        past = _cache_length(kwargs)
        if past == 0:
            args, kwargs, length = self._embed(args, kwargs)
            for name, value in (("attention_mask", 1), ("token_type_ids", 0), ("labels", -100)):
                if kwargs.get(name) is not None and kwargs[name].shape[1] == length:
                    kwargs[name] = _prepend(kwargs[name], self.count, value)
            positions = kwargs.get("position_ids")
            if positions is not None and positions.shape[-1] == length:
                start = torch.arange(self.count, device=positions.device).expand(positions.shape[0], -1)
                kwargs["position_ids"] = torch.cat([start, positions + self.count], dim=-1)
            return args, kwargs
        kwargs = dict(kwargs)
        current = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else (
            kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else args[0].shape[1])
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] == past + current - self.count:
            kwargs["attention_mask"] = _prepend(mask, self.count, 1)
        if kwargs.get("position_ids") is not None:  # callers count real tokens only
            kwargs["position_ids"] = kwargs["position_ids"] + self.count
        return args, kwargs

    def encoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs, length = self._embed(args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] == length:
            kwargs["attention_mask"] = _prepend(mask, self.count, 1)
        return args, kwargs

    def seq2seq(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Widen the mask the decoder uses over the (longer) encoder output."""
        mask = kwargs.get("attention_mask")
        if mask is None:
            return args, kwargs
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        encoded = kwargs.get("encoder_outputs")
        if ids is not None:
            widen = mask.shape[1] == ids.shape[1]
        elif kwargs.get("inputs_embeds") is not None:
            widen = mask.shape[1] == kwargs["inputs_embeds"].shape[1]
        elif encoded is not None:
            widen = mask.shape[1] == encoded[0].shape[1] - self.count
        else:
            widen = False
        if widen:
            kwargs = {**kwargs, "attention_mask": _prepend(mask, self.count, 1)}
        return args, kwargs


def embedding_host(modules: dict[str, nn.Module]) -> tuple[nn.Module | None, nn.Module | None]:
    """The model whose forward takes the input ids, and its input embedding: the backbone itself,
    or — for a user's wrapper without ``get_input_embeddings`` — the outermost model it holds
    that has one (the prompt's hooks go on that model's forward)."""
    for path in sorted(modules, key=lambda p: (p.count(".") if p else -1, p)):
        getter = getattr(modules[path], "get_input_embeddings", None)
        try:
            embedding = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            embedding = None
        if isinstance(embedding, nn.Module):
            return modules[path], embedding
    return None, None


@register
class SoftPromptModel(DeltaBase):
    """Prompt tuning on the model's input embeddings."""

    config_class = SoftPromptConfig
    default_modified_modules: ClassVar[list[str]] = ["embeddings"]
    supported_modules: ClassVar[tuple[str, ...]] = ("Embedding",)
    hooks_target_forward: ClassVar[bool] = False  # hooks the model, and calls the embedding itself

    @classmethod
    def select_targets(cls, paths: list[str], modules: dict[str, nn.Module]) -> list[str]:
        _, embedding = embedding_host(modules)
        names = [p for p, m in modules.items() if m is embedding]
        if embedding is None or paths != names[:1]:
            raise ModuleNotSupportedError(
                "soft_prompt attaches to the model's input embedding "
                f"({names[0] if names else 'none found: the model has no get_input_embeddings()'}), "
                f"not {', '.join(paths)}; leave modified_modules out or select that module"
            )
        return paths

    def make_delta(self, path: str, module: nn.Module, sizes: IOSizes) -> DeltaModule:
        device, dtype = self.placement(module)
        return SoftPrompt(module, self.config, device, dtype)  # type: ignore[arg-type]

    def wire(self, path: str, module: nn.Module, delta: DeltaModule) -> RouteHandle:
        host, _ = embedding_host(all_modules(self.backbone_model))
        return RouteHandle([_SoftPromptHooks(host, module, delta)])  # type: ignore[list-item,arg-type]
