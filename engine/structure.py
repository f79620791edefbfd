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

import logging
from typing import Any

from torch import nn

from engine.addressing import compile_selection
from engine.errors import ConfigError
from engine.roles import Roles, infer_roles
from engine.tree import ModuleTree

COMMON_NAMES = (
    "attn", "attn.q", "attn.k", "attn.v", "attn.o",
    "ff", "ff.w1", "ff.w2", "ff.gate", "layer_norm", "embeddings", "moe", "moe.experts",
)

#: Default positions only — a name the user wrote is never replaced. Where a model has no module in
#: a default's role, the first role of its chain that it has is used instead, and the choice logged.
DEFAULT_FALLBACKS: dict[str, tuple[str, ...]] = {
    # the attention block's output is its output projection's (some blocks name it oddly, or fold it)
    "attn.o": ("attn",),
    # a mixture of experts keeps its down-projections in fused 3-D parameters: after the whole block
    "ff.w2": ("moe",),
}
#: Models without attention projections (state-space, convolutional, Fourier-mixing, gated MLP
#: mixers): LoRA's q/v positions fall
#: back to the dense projections they do have, e.g. Mamba's in/out projections, ConvNeXt's pointwise
#: convolutions. Positions with no role at all are left out, as long as one default remains.
ATTENTION_FREE_FALLBACKS: dict[str, tuple[str, ...]] = {"attn.q": ("ff.w1",), "attn.v": ("ff.w2",)}

logger = logging.getLogger(__name__)

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


def _inferred(model: nn.Module) -> tuple[Roles, ModuleTree]:
    tree = ModuleTree.from_model(model)
    return infer_roles(model, tree), tree


def _model_label(model: nn.Module) -> str:
    model_type = model_type_of(model)
    return f"model type {model_type!r}" if model_type else type(model).__name__


def default_positions(model: nn.Module, defaults: list[str]) -> list[str]:
    """A method's default common names as they apply to this model (see DEFAULT_FALLBACKS).

    Raises when none of them, nor any fallback, exists: then the user must name modules.
    """
    table = COMMON_NAME_MAP.get(model_type_of(model) or "")
    if table is not None and all(name in table for name in defaults):
        return list(defaults)
    roles = _inferred(model)[0].by_role
    present = set(roles) | set(table or ())
    chosen: list[str] = []
    for name in defaults:
        chain = (name, *DEFAULT_FALLBACKS.get(name, ()))
        if not present & {"attn.q", "attn.k", "attn.v", "attn.qkv"}:
            chain += ATTENTION_FREE_FALLBACKS.get(name, ())
        pick = next((role for role in chain if role in present), None)
        if pick != name:
            logger.info("%s has no %r role; default position %s", _model_label(model), name,
                        f"{pick!r} used instead" if pick else "left out")
        if pick is not None and pick not in chosen:
            chosen.append(pick)
    if not chosen:
        found = ", ".join(sorted(r for r in present if r in COMMON_NAMES)) or "none"
        raise ConfigError(
            f"none of the default positions {', '.join(defaults)} (nor their fallbacks) was recognised "
            f"in {_model_label(model)} (roles found: {found}); give modified_modules by hand "
            "(see `delta-designer tree`)"
        )
    return chosen


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
            inferred = _inferred(model)
        roles, tree = inferred
        paths = roles.by_role.get(expression)
        if not paths:
            found = ", ".join(sorted(r for r in roles.by_role if r in COMMON_NAMES)) or "none"
            raise ConfigError(
                f"common name {expression!r}: no module of {_model_label(model)} was "
                f"recognised in that role (roles found: {found}); give the real module names in "
                "modified_modules (see `delta-designer tree`)"
            )
        result.extend(e for e in compile_selection(tree, paths) if e not in result)
    return result
