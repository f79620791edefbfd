"""PEFT's prefix tuning (``PREFIX_TUNING``) to and from this library's prefix deltas.

PEFT saves a prefix as ``prompt_embeddings``: (virtual tokens, layers × 2 × width), every layer's
keys then values, already through its MLP when ``prefix_projection`` was on. It feeds them to the
model as a cache, so the real tokens' positions start after the prefix: an imported prefix is
built with ``shift_positions=True`` to compute the same, and only such a prefix is exported.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.delta import DeltaBase
from engine.errors import CheckpointError, ConfigError


def _layers(delta: DeltaBase) -> list[Any]:
    return [delta.delta_modules[p.replace(".", "/")] for p in delta.modified_paths]


def _check_every_layer(delta: DeltaBase, layers: int | None = None) -> None:
    """PEFT prefixes every attention layer of a decoder or encoder (``layers`` of them, when the
    adapter says), in model order: so must this delta."""
    config: Any = getattr(delta.backbone_model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError("PEFT's prefix tuning of an encoder-decoder prefixes the decoder's self- and "
                          "cross-attention only, through a cache; that is not supported here")
    every = type(delta).plan(delta.backbone_model, type(delta.config).from_dict({}))
    if delta.modified_paths != every or (layers is not None and layers != len(every)):
        raise ConfigError(f"PEFT's prefix tuning prefixes every one of the model's {len(every)} attention layers"
                          f"{'' if layers is None else f' (the adapter has {layers})'}; this prefix has "
                          f"{len(delta.modified_paths)} ({delta.modified_paths[0]} …)")


def prefix_adapter_config(delta: DeltaBase, base: str | None, saved: list[str] | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a prefix delta that PEFT computes the same with."""
    config: Any = delta.config
    if not config.shift_positions:
        raise ConfigError("PEFT's prefix tuning starts the real tokens' positions after the prefix; this "
                          "prefix was built without shift_positions=True, so PEFT would compute otherwise. "
                          "Build (and train) it with shift_positions=True to export it")
    layers = _layers(delta)
    shapes = {layer.shape for layer in layers}
    if len(shapes) != 1:
        raise ConfigError(f"PEFT's prefix tuning has one width for every layer; this model's differ: {shapes}")
    _check_every_layer(delta)
    shape = shapes.pop()
    model = delta.backbone_model
    task = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() else "FEATURE_EXTRACTION"
    return {"peft_type": "PREFIX_TUNING", "task_type": task, "base_model_name_or_path": base,
            "num_virtual_tokens": config.prefix_token_num, "token_dim": shape.width,
            "num_attention_heads": shape.heads, "num_layers": len(layers), "num_transformer_submodules": 1,
            "encoder_hidden_size": shape.width, "prefix_projection": False, "modules_to_save": saved,
            "inference_mode": True}


def prefix_tensors(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """``prompt_embeddings``: each layer's keys then values, (tokens, layers × 2 × width)."""
    columns = []
    for layer in _layers(delta):
        keys, values = layer.key_values()  # (heads, tokens, head_dim)
        columns += [keys.detach().transpose(0, 1).flatten(1), values.detach().transpose(0, 1).flatten(1)]
    return {"prompt_embeddings": torch.cat(columns, dim=1)}


def prefix_config_from_peft(config: dict[str, Any]) -> dict[str, Any]:
    tokens = config.get("num_virtual_tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        raise CheckpointError("the PEFT prefix config has no valid num_virtual_tokens")
    return {"delta_type": "prefix", "prefix_token_num": tokens, "reparameterize": False, "shift_positions": True}


def prefix_state_from_peft(delta: DeltaBase, config: dict[str, Any],
                           tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our per-layer prefix tensors from PEFT's ``prompt_embeddings``."""
    layers = _layers(delta)
    _check_every_layer(delta, int(config.get("num_layers") or 0))
    embeddings = tensors.pop("prompt_embeddings", None)
    if embeddings is None:
        raise CheckpointError("the PEFT prefix adapter has no prompt_embeddings")
    shape = layers[0].shape
    heads = int(config.get("num_attention_heads") or 0)
    if heads != shape.heads or int(config.get("token_dim") or 0) != shape.width:
        raise ConfigError(f"the PEFT prefix has {heads} heads of width {config.get('token_dim')}, this model's "
                          f"attention keys {shape.heads} heads of width {shape.width}")
    expected = (delta.config.prefix_token_num, len(layers) * 2 * shape.width)  # type: ignore[attr-defined]
    if tuple(embeddings.shape) != expected:
        raise CheckpointError(f"prompt_embeddings is {tuple(embeddings.shape)}, expected {expected}")
    split = embeddings.view(expected[0], len(layers) * 2, shape.heads, shape.head_dim)
    state = {}
    for index, path in enumerate(delta.modified_paths):
        state[f"{path}.prefix_key"] = split[:, 2 * index].transpose(0, 1).contiguous()
        state[f"{path}.prefix_value"] = split[:, 2 * index + 1].transpose(0, 1).contiguous()
    return state
