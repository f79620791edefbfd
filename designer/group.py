"""A delta group of a design in progress: one method on a selection of modules (or the
'unfreeze' group), with the options the page edits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from engine import DeltaConfig, format_indices, method_for


@dataclass
class Group:
    """A delta group (one method on a selection of modules) or the 'unfreeze' group."""

    id: str
    name: str
    method: str
    route: str | None
    hyperparameters: dict[str, Any]
    selection: list[str] = field(default_factory=list)
    layer_ranges: dict[str, list[int]] = field(default_factory=dict)
    #: the expressions the user typed or imported (``attn.q`` stays ``attn.q``), shown and exported
    #: while the selection is exactly what they select; a tick or a layer range clears them
    typed: list[str] = field(default_factory=list)

    def config(self, expressions: list[str]) -> DeltaConfig:
        config_class = method_for(self.method).config_class
        return config_class.from_dict({**self.hyperparameters, "route": self.route, "name": self.name,
                                       "modified_modules": expressions})

    def __deepcopy__(self, memo: dict[int, Any]) -> Group:
        """A copy no later edit reaches, made fast: paths are immutable strings, so the lists are
        copied shallowly (undo snapshots and every edit copy groups of thousands of paths)."""
        return Group(self.id, self.name, self.method, self.route, copy.deepcopy(self.hyperparameters, memo),
                     list(self.selection), {k: list(v) for k, v in self.layer_ranges.items()}, list(self.typed))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "method": self.method, "route": self.route,
                "hyperparameters": self.hyperparameters,
                "layer_ranges": {k: format_indices(v) for k, v in self.layer_ranges.items()}}
