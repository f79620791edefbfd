"""Common names (``attn.q``, ``ff.w2``, …) and what they are called in each architecture.

The table below predates structural inference (``engine.roles``), which covers every other model
and agrees with it on its architectures (tests/engine/test_roles.py). ViT left the table when
transformers 5 renamed its modules (``attention.q_proj``, ``mlp.fc1``): inference follows such
renames by itself.

A common name in ``modified_modules`` is replaced by the architecture's own addressing
expressions, so one config works across model families. To address a module whose real name
happens to be a common name (GPT-2's ``attn``), write it as a regex: ``[r]attn``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.addressing import compile_selection
from engine.errors import ConfigError
from engine.roles import Roles, infer_roles
from engine.tree import ModuleTree

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
# no "embeddings" here: bart-style models have one input embedding (``shared``) tied to the
# encoder's and decoder's embed_tokens; inference finds it through get_input_embeddings()
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
    """Replace common names by the architecture's expressions; other expressions pass through.

    The hand-written table wins where it has the architecture; any other model's roles are
    inferred from its structure (``engine.roles``) and compiled to exact expressions.
    """
    model_type = model_type_of(model)
    table = COMMON_NAME_MAP.get(model_type or "")
    result: list[str] = []
    inferred: tuple[Roles, ModuleTree] | None = None  # computed once, only when needed
    for expression in expressions:
        if expression not in COMMON_NAMES:
            result.append(expression)
            continue
        if table is not None and expression in table:
            result.extend(e for e in table[expression] if e not in result)
            continue
        if inferred is None:
            tree = ModuleTree.from_model(model)
            inferred = (infer_roles(model, tree), tree)
        roles, tree = inferred
        paths = roles.by_role.get(expression)
        if not paths:
            found = ", ".join(sorted(r for r in roles.by_role if r in COMMON_NAMES)) or "none"
            raise ConfigError(
                f"common name {expression!r}: no module of "
                f"{'model type ' + repr(model_type) if model_type else type(model).__name__} was "
                f"recognised in that role (roles found: {found}); give the real module names in "
                "modified_modules (see `delta-designer tree`)"
            )
        result.extend(e for e in compile_selection(tree, paths) if e not in result)
    return result
