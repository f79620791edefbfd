"""Which ``adapter_config.json`` options an import reads, which it may ignore, and which it
refuses — checked before any tensor is read, so an adapter this library cannot reproduce fails
with the option's name, never with a shape or key error from deep inside.

An option not listed is refused when it is set to anything but an empty value (null, false, an
empty list or object): a PEFT release newer than this code may add behaviour we do not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from engine.errors import ConfigError

#: options that describe the run or the initialisation only: a trained adapter's tensors are
#: the same whatever they say
_DESCRIPTIVE = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "runtime_config", "ensure_weight_tying", "megatron_core", "qalora_group_size",
    "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init_text", "num_attention_heads",
    "num_layers", "init_ia3_weights", "eva_config", "_custom_modules", "lora_ga_config",
})
#: the options each adapter type's import reads
_READ: Mapping[str, frozenset[str]] = MappingProxyType({
    "LORA": frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
                       "bias", "use_rslora", "use_dora", "modules_to_save", "init_lora_weights",
                       "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                       "target_parameters"}),
    "IA3": frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                      "modules_to_save", "layers_to_transform", "layers_pattern"}),
    "PROMPT_TUNING": frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                "prompt_tuning_init", "modules_to_save"}),
    # the saved prompt_embeddings are the MLP's output when prefix_projection was on
    "PREFIX_TUNING": frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers",
                                "num_attention_heads", "encoder_hidden_size", "prefix_projection",
                                "modules_to_save"}),
})
#: read options whose values this library supports only in part, with why
_VALUES: Mapping[str, tuple[tuple[Any, ...], str]] = MappingProxyType({
    "bias": (("none", None), "trained biases of the wrapped layers are not part of a LoRA delta here"),
    # these initialisations change the base weights too (a residual is kept there): the adapter
    # alone does not reproduce the model unless PEFT converted it on saving
    "init_lora_weights": ((True, False, None, "gaussian", "eva", "orthogonal"),
                          "it changes the base model's weights at initialisation (PiSSA/OLoRA/LoftQ/CorDA), "
                          "which an adapter file does not carry; convert it to a plain LoRA in PEFT first "
                          "(save_pretrained(path_initial_model_for_weight_conversion=...))"),
    "num_transformer_submodules": ((1, None), "prompts for the decoder of an encoder-decoder are not supported"),
})


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def refuse_unsupported(config: dict[str, Any], peft_type: str) -> None:
    """Raise :class:`ConfigError` naming the first option of ``config`` this library cannot
    express; return quietly when every option is read, descriptive or empty."""
    read = _READ.get(peft_type)
    if read is None:
        raise ConfigError(f"PEFT adapters of type {peft_type!r} have no equivalent here; "
                          f"supported: {', '.join(_READ)}")
    for key, value in config.items():
        if key in _VALUES and key in read and value not in _VALUES[key][0]:
            raise ConfigError(f"this PEFT adapter sets {key}={value!r}, which this library cannot reproduce: "
                              f"{_VALUES[key][1]}")
        if key in read or key in _DESCRIPTIVE or _empty(value):
            continue
        raise ConfigError(
            f"this PEFT adapter sets {key}={value!r}, which this library cannot express for a {peft_type} "
            "adapter (nothing was loaded); remove the option in PEFT if it is not needed, or use PEFT itself")
