"""Common names (``attn.q``, ``ff.w2``, …) and what they are called in each architecture.

A common name in ``modified_modules`` is replaced by the architecture's own addressing
expressions, so one config works across model families. To address a module whose real name
happens to be a common name (GPT-2's ``attn``), write it as a regex: ``[r]attn``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.errors import ConfigError

COMMON_NAMES = (
    "attn", "attn.q", "attn.k", "attn.v", "attn.o",
    "ff", "ff.w1", "ff.w2", "ff.gate", "layer_norm", "embeddings",
)

_BERT_LIKE = {
    "attn": [r"[r]\d+\.attention"],  # the block; prefix descends to the module that attends
    "attn.q": ["attention.self.query"],
    "attn.k": ["attention.self.key"],
    "attn.v": ["attention.self.value"],
    "attn.o": ["attention.output.dense"],
    "ff": ["intermediate", r"[r]\d+\.output"],
    "ff.w1": ["intermediate.dense"],
    "ff.w2": [r"[r]\d+\.output\.dense"],
    "layer_norm": ["LayerNorm"],
    "embeddings": ["word_embeddings"],
}
_LLAMA_LIKE = {
    "attn": ["self_attn"],
    "attn.q": ["q_proj"],
    "attn.k": ["k_proj"],
    "attn.v": ["v_proj"],
    "attn.o": ["o_proj"],
    "ff": ["mlp"],
    "ff.w1": ["up_proj"],
    "ff.gate": ["gate_proj"],
    "ff.w2": ["down_proj"],
    "layer_norm": [r"[r]\w*norm"],
    "embeddings": ["embed_tokens"],
}
_BART_LIKE = {
    "attn": [r"[r](self_attn|encoder_attn)"],
    "attn.q": ["q_proj"],
    "attn.k": ["k_proj"],
    "attn.v": ["v_proj"],
    "attn.o": ["out_proj"],
    "ff": ["fc1", "fc2"],
    "ff.w1": ["fc1"],
    "ff.w2": ["fc2"],
    "layer_norm": [r"[r]\w*layer_norm\w*"],
    "embeddings": ["embed_tokens"],
}

#: model_type → common name → expressions in that architecture.
COMMON_NAME_MAP: dict[str, dict[str, list[str]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "deberta-v2": {
        **_BERT_LIKE,
        "attn.q": ["query_proj"],
        "attn.k": ["key_proj"],
        "attn.v": ["value_proj"],
    },
    "vit": {
        **_BERT_LIKE,
        "attn.q": ["attention.attention.query"],
        "attn.k": ["attention.attention.key"],
        "attn.v": ["attention.attention.value"],
        "layer_norm": [r"[r]layernorm\w*"],
        "embeddings": ["patch_embeddings.projection"],
    },
    "gpt2": {
        "attn": ["[r]attn"],
        # GPT-2 fuses q, k and v into one projection: each of them means c_attn
        "attn.q": ["c_attn"],
        "attn.k": ["c_attn"],
        "attn.v": ["c_attn"],
        "attn.o": ["attn.c_proj"],
        "ff": ["mlp"],
        "ff.w1": ["c_fc"],
        "ff.w2": ["mlp.c_proj"],
        "layer_norm": [r"[r]ln_\w+"],
        "embeddings": ["wte"],
    },
    "opt": {**_BART_LIKE, "attn": ["self_attn"], "embeddings": ["embed_tokens"]},
    "bart": _BART_LIKE,
    "t5": {
        "attn": [r"[r](SelfAttention|EncDecAttention)"],
        "attn.q": ["q"],
        "attn.k": ["k"],
        "attn.v": ["v"],
        "attn.o": ["o"],
        "ff": ["DenseReluDense"],
        "ff.w1": [r"[r]wi(_0|_1)?"],
        "ff.w2": ["wo"],
        "layer_norm": [r"[r]\w*layer_norm"],
        "embeddings": ["shared"],
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def model_type_of(model: nn.Module) -> str | None:
    config: Any = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def expand_common_names(model: nn.Module, expressions: list[str]) -> list[str]:
    """Replace common names by the architecture's expressions; other expressions pass through."""
    model_type = model_type_of(model)
    table = COMMON_NAME_MAP.get(model_type or "")
    result: list[str] = []
    for expression in expressions:
        if expression not in COMMON_NAMES:
            result.append(expression)
            continue
        if table is None or expression not in table:
            raise ConfigError(
                f"common name {expression!r} has no mapping for "
                f"{'model type ' + repr(model_type) if model_type else type(model).__name__}; "
                "give the real module names in modified_modules (see `delta-designer tree`)"
            )
        result.extend(e for e in table[expression] if e not in result)
    return result
