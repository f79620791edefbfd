"""Common names (``attn.q``, ``ff.w2``, …) and what they are called in each architecture.

Roles are inferred from each model's structure (``engine.roles``), so renames across transformers
releases (ViT's ``attention.q_proj`` in 5.x) need no table update; ``COMMON_NAME_MAP`` overrides
inference only where it is wrong.

A common name in ``modified_modules`` is replaced by the architecture's own addressing
expressions, so one config works across model families. A real module name always means that
module: a typed name that is both (T5's ``layer_norm``) selects the real modules, and the log
says so. OpenDelta's spellings (``attn.proj``, ``crossattn.q``, ``lm_head.proj``, …) are common
names too.

Common names and default positions never select the output head (``lm_head``; OpenDelta's
``default_exclude_modules``) — except ``lm_head.proj``, OpenDelta's name for it: training it is
a choice a person makes by typing a name for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from engine.addressing import compile_selection
from engine.errors import ConfigError
from engine.roles.inference import Roles, infer_roles
from engine.tree import ModuleTree, all_modules

COMMON_NAMES = (
    "attn", "attn.q", "attn.k", "attn.v", "attn.o", "attn.layer_norm",
    "ff", "ff.w1", "ff.w2", "ff.gate", "ff.layer_norm", "layer_norm", "embeddings", "moe", "moe.experts",
    # OpenDelta's spellings (its common_structure mapping)
    "attn.proj", "lm_head.proj", "crossattn", "crossattn.q", "crossattn.k", "crossattn.v", "crossattn.proj",
    "crossattn.layer_norm",
)
#: OpenDelta's names for roles that have another name here
_ALIASES: Mapping[str, str] = MappingProxyType({
    "attn.proj": "attn.o", "crossattn": "cross_attn", "crossattn.layer_norm": "cross_attn.layer_norm"})
#: OpenDelta's cross-attention projections: the projection roles, inside cross-attention blocks
_CROSS_PROJECTIONS: Mapping[str, str] = MappingProxyType({
    "crossattn.q": "attn.q", "crossattn.k": "attn.k", "crossattn.v": "attn.v", "crossattn.proj": "attn.o"})

#: Default positions only — a name the user wrote is never replaced. Where a model has no module in
#: a default's role, the first role of its chain that it has is used instead, and the choice logged.
DEFAULT_FALLBACKS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    # the attention block's output is its output projection's (some blocks name it oddly, or fold it)
    "attn.o": ("attn",),
    # a mixture of experts keeps its down-projections in fused 3-D parameters: after the whole block
    "ff.w2": ("moe",),
})
#: Models without attention projections (state-space, convolutional, Fourier-mixing, gated MLP
#: mixers): LoRA's q/v positions fall back to the dense projections they do have, e.g. Mamba's
#: in/out projections, ConvNeXt's pointwise convolutions. Positions with no role at all are left
#: out, as long as one default remains.
ATTENTION_FREE_FALLBACKS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"attn.q": ("ff.w1",), "attn.v": ("ff.w2",)})

logger = logging.getLogger(__name__)

#: model_type → common name → expressions, for the architectures where structural inference
#: (``engine.roles``) gets a role wrong. Every entry must say why. There are none today: the names
#: a person would write for bert, roberta, deberta-v2, gpt2, opt, bart, t5, llama, mistral and
#: qwen2 — the table this library started with — are what inference finds
#: (tests/engine/test_roles.py keeps them as its expectations).
COMMON_NAME_MAP: Mapping[str, Mapping[str, list[str]]] = MappingProxyType({})


class ModelStructure:
    """One model's modules, tree and inferred roles, each computed on first use.

    Made per operation (a delta's construction, an estimate) and never cached beyond it, so a
    model whose modules change — a delta attached, a layer replaced — is never described by stale
    roles, and threads never share it.
    """

    def __init__(self, model: nn.Module, tree: ModuleTree | None = None) -> None:
        self.model = model
        self._tree = tree
        self._modules: dict[str, nn.Module] | None = None
        self._roles: Roles | None = None
        #: what pseudo passes learnt about kinds of modules (see ``engine.reach``)
        self.reach: dict[Any, str | None] = {}
        #: results a plan and the build that follows it both need (e.g. resolved rank patterns)
        self.memo: dict[Any, Any] = {}

    @classmethod
    def of(cls, target: nn.Module | ModelStructure) -> ModelStructure:
        return target if isinstance(target, ModelStructure) else cls(target)

    @property
    def modules(self) -> dict[str, nn.Module]:
        if self._modules is None:
            self._modules = all_modules(self.model)
        return self._modules

    @property
    def tree(self) -> ModuleTree:
        if self._tree is None:
            self._tree = ModuleTree.from_model(self.model)
        return self._tree

    @property
    def roles(self) -> Roles:
        if self._roles is None:
            self._roles = infer_roles(self.model, self.tree)
        return self._roles

    def role_paths(self, role: str) -> list[str]:
        """The modules in ``role``, never the output head (nor a module sharing its weight)."""
        head = set(self.roles.by_role.get("head", ()))
        return [p for p in self.roles.by_role.get(role, ()) if p not in head]

    def common_paths(self, name: str) -> list[str]:
        """The modules a common name stands for (OpenDelta's spellings included). Only
        ``lm_head.proj``, which names it, selects the output head."""
        if name == "lm_head.proj":
            return list(self.roles.by_role.get("head", ()))
        if name in _CROSS_PROJECTIONS:
            blocks = self.role_paths("cross_attn")
            return [p for p in self.role_paths(_CROSS_PROJECTIONS[name])
                    if any(p.startswith(b + ".") for b in blocks)]
        return self.role_paths(_ALIASES.get(name, name))


def model_type_of(model: nn.Module) -> str | None:
    config: Any = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _model_label(model: nn.Module) -> str:
    model_type = model_type_of(model)
    return f"model type {model_type!r}" if model_type else type(model).__name__


def available_roles(target: nn.Module | ModelStructure) -> set[str]:
    """The common names this model has modules for."""
    structure = ModelStructure.of(target)
    table = COMMON_NAME_MAP.get(model_type_of(structure.model) or "", {})
    return set(table) | {r for r in COMMON_NAMES if structure.common_paths(r)}


def default_positions(target: nn.Module | ModelStructure, defaults: list[str]) -> list[str]:
    """A method's default common names as they apply to this model (see DEFAULT_FALLBACKS).

    Raises when none of them, nor any fallback, exists: then the user must name modules.
    """
    structure = ModelStructure.of(target)
    model = structure.model
    table = COMMON_NAME_MAP.get(model_type_of(model) or "")
    if table is not None and all(name in table for name in defaults):
        return list(defaults)
    present = available_roles(structure)
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


def expand_common_names(target: nn.Module | ModelStructure, expressions: list[str], *,
                        typed: bool = True) -> list[str]:
    """Replace common names by the architecture's expressions; other expressions pass through.

    The hand-written table wins where it has the architecture; any other model's roles are
    inferred from its structure (``engine.roles``) and compiled to exact expressions. A name a
    person ``typed`` that is also a real module name in this model (T5's ``layer_norm``,
    Blenderbot's) means that module, as a real name always does; the log says so. A method's
    default positions (``typed=False``) are always roles.
    """
    structure = ModelStructure.of(target)
    model = structure.model
    table = COMMON_NAME_MAP.get(model_type_of(model) or "")
    result: list[str] = []
    for expression in expressions:
        if expression not in COMMON_NAMES:
            result.append(expression)
            continue
        if typed and structure.tree.tails().get(expression):
            logger.info("%r is a module name in %s: it selects those modules, not the common name's "
                        "(write the modules you mean, e.g. from `delta-designer tree`, for the role)",
                        expression, _model_label(model))
            result.append(expression)
            continue
        if table is not None and expression in table:
            result.extend(e for e in table[expression] if e not in result)
            continue
        paths = structure.common_paths(expression)
        if not paths:
            found = ", ".join(sorted(r for r in COMMON_NAMES if structure.common_paths(r))) or "none"
            raise ConfigError(
                f"common name {expression!r}: no module of {_model_label(model)} was "
                f"recognised in that role (roles found: {found}); give the real module names in "
                "modified_modules (see `delta-designer tree`)"
            )
        result.extend(e for e in compile_selection(structure.tree, paths) if e not in result)
    return result
