"""A *design*: several deltas on one backbone plus modules to unfreeze (``delta-design/1``).

It is what the designer edits and exports. Each entry of ``deltas`` is a valid
``AutoDeltaConfig.from_dict`` input, optionally with the ``resolved_modules`` and
``trainable_parameters`` it had when exported; ``apply`` checks them against the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from engine.addressing import resolve
from engine.auto import AutoDeltaConfig
from engine.config import DeltaConfig
from engine.delta import DeltaBase
from engine.errors import ConfigError, DeltaError
from engine.estimate import estimate_delta, module_parameters
from engine.registry import method_for
from engine.roles import ModelStructure, expand_common_names
from engine.tree import ModuleTree

FORMAT = "delta-design/1"
_EXPORT_ONLY = ("resolved_modules", "trainable_parameters")


class DesignMismatchError(ConfigError):
    """A design's recorded modules or counts do not match the backbone it is applied to."""


@dataclass
class AppliedDesign:
    """The deltas a design built, attached to one backbone."""

    deltas: list[DeltaBase]
    unfrozen_paths: list[str]
    model: nn.Module

    def num_trainable_parameters(self) -> int:
        """Everything that trains: every delta plus the unfrozen backbone modules (each once)."""
        unique = {id(p): p for p in self.model.parameters() if p.requires_grad}
        for delta in self.deltas:
            unique.update({id(p): p for p in delta.parameters() if p.requires_grad})
        return sum(p.numel() for p in unique.values())

    def detach(self) -> None:
        for delta in reversed(self.deltas):
            if delta.is_attached:
                delta.detach()


@dataclass
class Design:
    """Deltas (configs) plus unfrozen modules, with the backbone they were designed on."""

    deltas: list[DeltaConfig] = field(default_factory=list)
    unfrozen_modules: list[str] = field(default_factory=list)
    backbone: dict[str, Any] = field(default_factory=dict)
    recorded: list[dict[str, Any]] = field(default_factory=list)  # exported resolved modules/counts

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Design:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f'a design is a JSON object with "format": "{FORMAT}"')
        entries = data.get("deltas", [])
        if not isinstance(entries, list):
            raise ConfigError('"deltas" must be a list of delta configs')
        configs, recorded = [], []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ConfigError(f"deltas[{index}] must be an object, got {type(entry).__name__}")
            try:
                configs.append(AutoDeltaConfig.from_dict(
                    {k: v for k, v in entry.items() if k not in _EXPORT_ONLY}, strict=True))
            except DeltaError as exc:
                raise ConfigError(f"deltas[{index}] ({entry.get('name', '?')}): {exc}") from exc
            recorded.append({k: entry[k] for k in _EXPORT_ONLY if k in entry})
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"delta names must be unique in a design; repeated: {', '.join(map(str, duplicates))}")
        unfrozen = data.get("unfrozen_modules", [])
        if not isinstance(unfrozen, list) or not all(isinstance(u, str) for u in unfrozen):
            raise ConfigError('"unfrozen_modules" must be a list of addressing expressions')
        return cls(configs, list(unfrozen), dict(data.get("backbone") or {}), recorded)

    def build(self, model: nn.Module) -> AppliedDesign:
        """Build every delta, check the recorded modules, then attach all and freeze the rest.

        A design that adds no delta and unfreezes nothing would train nothing — or, with nothing
        frozen, the whole backbone — so it is refused. If anything fails, every delta this call
        attached is detached again: the model is left as it was.
        """
        if not self.deltas and not self.unfrozen_modules:
            raise ConfigError(
                "this design has no delta and unfreezes no module, so building it would train "
                "nothing; add a delta group (or unfreeze a module) first")
        structure = ModelStructure(model)
        planned, unfrozen = self.plan(model, structure)
        deltas = [method_for(c.delta_type)(model, config=c, attach=False, paths=paths, structure=structure)
                  for c, paths in zip(self.deltas, planned)]
        try:
            for delta in deltas:
                delta.attach()
            for delta in deltas:
                delta.freeze_module(exclude=["deltas", *self.unfrozen_modules], set_state_dict=False)
        except BaseException:
            for delta in reversed(deltas):
                if delta.is_attached:
                    delta.detach()
            raise
        if not deltas:  # only unfrozen modules train
            keep = {id(p) for path in unfrozen for p in structure.modules[path].parameters()}
            for parameter in model.parameters():
                parameter.requires_grad_(id(parameter) in keep)
        return AppliedDesign(deltas, unfrozen, model)

    def plan(self, model: nn.Module, structure: ModelStructure | None = None) -> tuple[list[list[str]], list[str]]:
        """Where each delta goes and which modules it unfreezes on ``model``, checked against the
        modules recorded when the design was exported — nothing built or attached (the designer
        checks imports this way on the backbone all its sessions share)."""
        structure = structure if structure is not None else ModelStructure(model)
        planned = []
        for config, recorded in zip(self.deltas, self.recorded or [{}] * len(self.deltas)):
            paths = method_for(config.delta_type).plan(model, config, structure=structure)
            expected = recorded.get("resolved_modules")
            if expected is not None and list(expected) != paths:
                missing = [p for p in expected if p not in paths]
                extra = [p for p in paths if p not in expected]
                raise DesignMismatchError(
                    f"delta {config.name!r} resolves to other modules on this backbone than when it "
                    f"was designed: no longer matched {missing[:6]}; newly matched {extra[:6]}"
                )
            planned.append(paths)
        unfrozen = (
            resolve(structure.tree, expand_common_names(structure, self.unfrozen_modules)).paths
            if self.unfrozen_modules else []
        )
        return planned, unfrozen

    def apply(self, model: nn.Module) -> AppliedDesign:
        """Alias of :meth:`build` (DESIGN.md's ``Design.apply``)."""
        return self.build(model)

    def to_dict(self, model: nn.Module | None = None, tree: ModuleTree | None = None) -> dict[str, Any]:
        """The ``delta-design/1`` document; with ``model``, resolved modules and counts too.

        Counting plans each delta and sizes it exactly (``estimate_delta``) without attaching
        anything or touching ``requires_grad``, so exporting never changes the model.
        """
        entries: list[dict[str, Any]] = []
        totals: dict[str, Any] = {}
        if model is not None:
            tree = tree if tree is not None else ModuleTree.from_model(model)
            total = 0
            for config in self.deltas:
                estimate = estimate_delta(model, config, tree)
                entries.append({**config.to_dict(), "resolved_modules": estimate.paths,
                                "trainable_parameters": estimate.total})
                total += estimate.total
            if self.unfrozen_modules:
                unfrozen = resolve(tree, expand_common_names(model, self.unfrozen_modules)).paths
                total += module_parameters(tree, unfrozen)
            totals = {"trainable_parameters": total}
        else:
            entries = [{**c.to_dict(), **r} for c, r in zip(self.deltas, self.recorded or [{}] * len(self.deltas))]
        document: dict[str, Any] = {
            "format": FORMAT,
            "backbone": self.backbone,
            "deltas": entries,
            "unfrozen_modules": self.unfrozen_modules,
        }
        if totals:
            document["totals"] = {**totals, "backbone_parameters": self.backbone.get("parameters")}
        return document
