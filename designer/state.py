"""The backbone a designer server shows, loaded once on first use (never at import time)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from engine import Backbone, ModuleTree, load_backbone


@dataclass
class LoadedBackbone:
    """A backbone with its full and collapsed trees, built once."""

    backbone: Backbone
    tree: ModuleTree
    collapsed: ModuleTree

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.backbone.source,
            "class_name": self.backbone.class_name,
            "is_meta": self.backbone.is_meta,
            "parameters": self.tree.total_parameters,
            "modules": len(self.tree.paths),
        }


class BackboneStore:
    """Loads the configured backbone lazily and thread-safely; web sources never run code."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._loaded: LoadedBackbone | None = None
        self._lock = threading.Lock()

    def get(self) -> LoadedBackbone:
        with self._lock:
            if self._loaded is None:
                backbone = load_backbone(self.source)
                tree = ModuleTree.from_model(backbone.model)
                self._loaded = LoadedBackbone(backbone, tree, tree.collapse())
            return self._loaded
