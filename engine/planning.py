"""Where a delta goes: resolving ``modified_modules`` (real names, expressions, common names or the
method's default positions) to checked target paths, before anything is built.

:class:`Planning` is the part of :class:`~engine.delta.DeltaBase` that works on a model without a
delta object — the designer's live estimates plan many configs this way.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from torch import nn

from engine.addressing import resolve
from engine.config import DeltaConfig
from engine.errors import ConfigError, ModuleNotSupportedError
from engine.locking import model_lock
from engine.reach import find_bypassed
from engine.roles import ModelStructure, default_positions, expand_common_names
from engine.roles.kinds import declares_linear
from engine.targets import inside_delta
from engine.tree import ModuleTree

logger = logging.getLogger(__name__)


class Planning:
    """Class-level planning of a method's targets (mixed into DeltaBase)."""

    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    #: Common names used when ``modified_modules`` is not given.
    default_modified_modules: ClassVar[list[str]] = []
    #: Module types a delta can wrap (class names, so optional libraries need not be imported).
    supported_modules: ClassVar[tuple[str, ...]] = ()
    #: Whether the delta runs in its targets' forward (so a target the model bypasses is refused).
    hooks_target_forward: ClassVar[bool] = True

    @classmethod
    def plan(
        cls,
        backbone_model: nn.Module,
        config: DeltaConfig,
        *,
        structure: ModelStructure | None = None,
        tree: ModuleTree | None = None,
    ) -> list[str]:
        """The module paths this config modifies on ``backbone_model``, checked, nothing built.

        Pass the backbone's ``tree`` (or a whole ``structure``) to reuse its addressing index
        (the designer does). Targets the model's forward bypasses are refused by name — or, for
        default positions, left out with a log line.
        """
        with model_lock(backbone_model):  # another thread may be attaching to this model
            structure = structure if structure is not None else ModelStructure(backbone_model, tree)
            modules = structure.modules
            targets = cls.select_targets(cls._resolve(structure, config), modules)
            seen: set[int] = set()  # a module shared by two paths is wrapped once, at its first path
            targets = [p for p in targets if not (id(modules[p]) in seen or seen.add(id(modules[p])))]
            for path in targets:
                cls.check_module(path, modules[path])
            if cls.hooks_target_forward:
                targets = cls._without_bypassed(structure, config, targets)
            return targets

    @classmethod
    def _without_bypassed(cls, structure: ModelStructure, config: DeltaConfig, targets: list[str]) -> list[str]:
        bypassed = find_bypassed(structure, targets)
        if not bypassed:
            return targets
        path, reader = next(iter(bypassed.items()))
        reason = (f"the model never calls {path!r}; it reads its parameters directly ({reader} on "
                  f"{path}'s weight), so a {config.delta_type} hook there would never run")
        if config.modified_modules is not None:
            others = [p for p in bypassed if p != path]
            raise ModuleNotSupportedError(
                f"{config.delta_type} cannot modify {path!r}: {reason}"
                + (f" (the same holds for {', '.join(others[:4])}{' …' if len(others) > 4 else ''})" if others else "")
                + "; choose modules the forward calls (`delta-designer tree` lists them)")
        kept = [p for p in targets if p not in bypassed]
        logger.info("default positions: left out %d module(s) the model bypasses: %s", len(bypassed), reason)
        if not kept:
            raise ModuleNotSupportedError(
                f"{config.delta_type}: every default position is bypassed by the model ({reason}); "
                "give modified_modules by hand")
        return kept

    @classmethod
    def variants(cls, structure: ModelStructure, config: DeltaConfig, paths: list[str]) -> dict[str, Any]:
        """Per-path settings that make identically shaped modules get different deltas (e.g. a
        per-module rank); live estimates group modules by fingerprint *and* variant."""
        return {}

    @classmethod
    def select_targets(cls, paths: list[str], modules: dict[str, nn.Module]) -> list[str]:
        """The modules to modify, from what the expressions resolved to (default: as resolved)."""
        return paths

    @classmethod
    def check_module(cls, path: str, module: nn.Module) -> None:
        """Raise :class:`ModuleNotSupportedError` if this method cannot wrap ``module``."""
        declared = "Linear" in cls.supported_modules and declares_linear(module)  # I-BERT's QuantLinear
        if cls.supported_modules and type(module).__name__ not in cls.supported_modules and not declared and not any(
            isinstance(module, getattr(nn, n, ())) for n in cls.supported_modules
        ):
            raise ModuleNotSupportedError(
                f"{cls.config_class.delta_type} cannot wrap {path!r}, a {type(module).__name__}; "
                f"it wraps {', '.join(cls.supported_modules)} — choose those modules instead "
                "(`delta-designer tree` shows every module's class)"
            )

    @classmethod
    def _resolve(cls, structure: ModelStructure, config: DeltaConfig) -> list[str]:
        expressions = config.modified_modules
        typed = bool(expressions) and not config.common_structure
        if not expressions:
            if not cls.default_modified_modules:
                raise ConfigError(f"{config.delta_type} has no default positions; give modified_modules")
            expressions = default_positions(structure, cls.default_modified_modules)
        report = resolve(
            structure.tree,
            expand_common_names(structure, list(expressions), typed=typed),
            expand_common_names(structure, list(config.exclude_modules)),
        )
        if not report.paths:
            raise ConfigError(
                f"exclude_modules removed every module that modified_modules selected "
                f"({', '.join(config.exclude_modules)})"
            )
        paths = [p for p in report.paths if not inside_delta(p, structure.modules)]
        if not paths:
            raise ConfigError(
                f"modified_modules {list(expressions)} select only modules of other deltas; "
                "a delta wraps backbone modules"
            )
        return paths
